"""The demo (`python -m cquant.demo`, `make demo`) and the bundled model it runs."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import cquant
from cquant import demo, models, nn
from cquant.quantization import QuantizedLinear, Quantizer


def test_default_model_is_deterministic_and_sized():
    cfg = models.ModelConfig()
    m = models.build_default_model(seed=0, depth=1)  # sizes as the default, one block: quicker
    assert m.config.dim == cfg.dim and len(m.blocks) == 1
    a = models.build_default_model(seed=3, config=models.ModelConfig.small())
    b = models.build_default_model(seed=3, config=models.ModelConfig.small())
    c = models.build_default_model(seed=4, config=models.ModelConfig.small())
    tokens = models.sample_inputs(2, 8, seed=1, config=a.config)
    assert tokens.shape == (2, 8) and tokens.dtype == np.int64 and tokens.max() < a.config.vocab_size
    np.testing.assert_array_equal(a(tokens), b(tokens))
    assert not np.array_equal(a(tokens), c(tokens))
    # the full default: ~13M parameters in 9 Linear layers (computed without building it)
    d, h, L = cfg.dim, cfg.hidden, cfg.depth
    n_params = (cfg.vocab_size + cfg.max_seq) * d + L * (2 * d + d * h + h + h * d + d) + 2 * d \
        + d * cfg.num_classes + cfg.num_classes
    assert 10e6 <= n_params <= 20e6


def test_small_model_quantizes_every_linear():
    m = models.build_default_model(0, models.ModelConfig.small())
    n_linear = sum(isinstance(x, nn.Linear) for x in m.modules())
    q = Quantizer("dynamic")
    q.quantize(m)
    assert sum(isinstance(x, QuantizedLinear) for x in m.modules()) == n_linear == 2 * m.config.depth + 1


def test_demo_run_small():
    buf = io.StringIO()
    res = demo.run(batch=2, seq=8, repeats=1, small=True, progress=False, out=buf)
    text = buf.getvalue()
    assert set(res) == {"float32", "int8 weight_only", "int8 dynamic"}
    for name in res:
        assert name in text
    assert f"{cquant.get_num_threads()} thread(s)" in text and cquant.isa() in text
    f32 = res["float32"]
    assert f32["max_rel"] == 0.0 and f32["min_cos"] > 1 - 1e-12
    for name in ("int8 weight_only", "int8 dynamic"):
        r = res[name]
        assert np.isfinite([r["max_rel"], r["mean_rel"], r["min_cos"], r["latency_s"]]).all()
        assert 0 < r["mean_rel"] <= r["max_rel"] and r["min_cos"] <= r["mean_cos"] <= 1
        assert r["bytes"] < f32["bytes"] and r["linear_bytes"] < f32["linear_bytes"]


def test_compare_outputs_metric():
    y = np.array([[3.0, 4.0], [1.0, 0.0]])
    r = demo.compare_outputs(y * np.array([[1.0], [1.0]]) + np.array([[0.0, 0.5], [0.0, 0.0]]), y)
    assert np.isclose(r["max_rel"], 0.1) and np.isclose(r["mean_rel"], 0.05)
    assert r["min_cos"] < 1 and np.isclose(demo.compare_outputs(y, y)["mean_cos"], 1.0)


def test_module_entry_point():
    pkg_parent = Path(cquant.__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(pkg_parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "cquant.demo", "--small", "--repeats", "1", "--batch", "2",
                           "--seq", "8", "--no-progress"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "int8 dynamic" in proc.stdout and "latency ms" in proc.stdout


def test_demo_header_says_the_scheme_that_ran():
    """A group size that divides no K falls back to per_channel: the header said per_group(48)."""
    buf = io.StringIO()
    demo.run(batch=2, seq=8, repeats=1, small=True, progress=False, out=buf, granularity="per_group", group_size=48)
    head = buf.getvalue().splitlines()[0]
    assert "5 of 5 Linear layers quantized, per_channel; asked per_group(48)" in head
    buf = io.StringIO()
    demo.run(batch=2, seq=8, repeats=1, small=True, progress=False, out=buf, granularity="per_group", group_size=32)
    assert "Linear layers quantized, per_group(32))" in buf.getvalue().splitlines()[0]
