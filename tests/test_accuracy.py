"""Error budgets derived from the quantization step (cquant.accuracy.error_bound), for Gaussian and
heavy-tailed Student-t weights and activations, every mode and granularity, every ISA path."""
import numpy as np
import pytest

import cquant
from cquant import accuracy, ops


@pytest.mark.parametrize("dist", accuracy.DISTRIBUTIONS)
@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
@pytest.mark.parametrize("gran,g", accuracy.SCHEMES)
def test_error_within_quantization_bound(isa, dist, mode, gran, g):
    rng = np.random.default_rng(7)
    w = accuracy.sample(dist, (96, 256), rng)
    x = accuracy.sample(dist, (9, 256), rng)
    qw = ops.quantize_weight(w, gran, g)
    y = ops.linear(x, qw, mode=mode).astype(np.float64)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    assert (np.abs(y - ref) <= accuracy.error_bound(x, w, qw, mode)).all()


def test_finer_scales_are_more_accurate_on_heavy_tails():
    """Per-group < per-channel < per-tensor error on Student-t weights: the point of finer scales."""
    rows = {(r["mode"], r["scheme"]): r["rel"] for r in accuracy.run(m=16, k=512, n=256, seed=3)
            if r["dist"] == "student_t3"}
    for mode in ("dynamic", "weight_only"):
        assert rows[(mode, "per_group(32)")] < rows[(mode, "per_channel")] < rows[(mode, "per_tensor")]


def test_packed_weight_runs_on_every_path():
    """A weight packed while one path was active gives the same results on every other path."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((40, 72)).astype(np.float32)
    x = rng.standard_normal((5, 72)).astype(np.float32)
    qw = ops.quantize_weight(w, "per_group", 8)
    out = {}
    try:
        for name in cquant.available_isas():
            cquant.set_isa(name)
            out[name] = ops.linear(x, qw, mode="dynamic")
    finally:
        cquant.set_isa("auto")
    ref = out["scalar"]
    for y in out.values():
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_accuracy_cli_runs(capsys):
    assert accuracy.main(["--m", "4", "--k", "256", "--n", "32"]) == 0
    assert "student_t3" in capsys.readouterr().out
