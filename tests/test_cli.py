"""The cquant command: streaming quantize, report, info, bench, and its error handling."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import cquant
from cquant import cli
from cquant.io import KEY_LAYERS, SafetensorsReader, StreamWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python") + os.pathsep + os.environ.get("PYTHONPATH", ""))

_CODES = {"float32": "F32", "float16": "F16", "int64": "I64", "float64": "F64"}


def write_checkpoint(path, arrays, metadata=None):
    """A safetensors file written with cquant's own streaming writer (no safetensors package needed)."""
    with open(path, "wb") as f:
        w = StreamWriter(f, [(k, _CODES[str(v.dtype)], v.shape) for k, v in arrays.items()], metadata)
        for k, v in arrays.items():
            w.write(k, v)
        w.close()


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "embeddings.word_embeddings.weight": rng.standard_normal((50, 32)).astype(np.float32),
        "embeddings.position_ids": np.arange(16, dtype=np.int64)[None],
        "layer.0.fc1.weight": rng.standard_normal((64, 32)).astype(np.float32),
        "layer.0.fc1.bias": rng.standard_normal(64).astype(np.float32),
        "layer.0.norm.weight": np.ones(64, np.float32),
        "layer.0.fc2.weight": rng.standard_normal((32, 64)).astype(np.float16),
        "layer.0.fc2.bias": rng.standard_normal(32).astype(np.float32),
        "h.0.attn.c_attn.weight": rng.standard_normal((32, 96)).astype(np.float32),   # GPT-2 (in, out)
        "head.weight": rng.standard_normal((10, 64)).astype(np.float32),
    }


def run(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_quantize_selects_linear_weights_and_copies_the_rest(tmp_path, capsys):
    arrays = _arrays()
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    write_checkpoint(src, arrays, {"format": "pt"})
    rc, out, err = run(["quantize", src, "-o", dst, "--exclude", "head", "--transposed", "*.c_attn.weight"], capsys)
    assert rc == 0, err
    assert "quantized" in out and "peak RSS" in out
    with SafetensorsReader(dst) as r:
        layers = json.loads(r.metadata[KEY_LAYERS])
        assert r.metadata["format"] == "pt"                       # input metadata kept
        assert set(layers) == {"layer.0.fc1", "layer.0.fc2", "h.0.attn.c_attn"}
        assert layers["h.0.attn.c_attn"]["layout"] == "in_out" and layers["h.0.attn.c_attn"]["shape"] == [96, 32]
        for name in ("embeddings.word_embeddings.weight", "embeddings.position_ids", "layer.0.norm.weight",
                     "head.weight", "layer.0.fc1.bias"):
            np.testing.assert_array_equal(r.tensor(name), arrays[name])
        q, s = cquant.ops.quantize(arrays["layer.0.fc1.weight"])
        np.testing.assert_array_equal(r.tensor("layer.0.fc1.weight_q"), q)
        np.testing.assert_array_equal(r.tensor("layer.0.fc1.weight_scale"), s)
        q2, _ = cquant.ops.quantize(arrays["h.0.attn.c_attn.weight"].T)
        np.testing.assert_array_equal(r.tensor("h.0.attn.c_attn.weight_q"), q2)
        assert "layer.0.fc1.weight" not in r.infos
    pytest.importorskip("safetensors", reason="safetensors is not installed")
    ck = cquant.load(dst)                                         # a regular cquant checkpoint
    assert ck.layers["layer.0.fc1"].mode == "dynamic"
    x = np.ones((2, 32), np.float32)
    y = ck.layers["layer.0.fc1"](x)
    ref = x @ arrays["layer.0.fc1.weight"].T + arrays["layer.0.fc1.bias"]
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 0.02


def test_quantize_per_group_falls_back_for_indivisible_and_reports(tmp_path, capsys):
    """A layer whose K is not a multiple of the group size is stored per_channel, as the Python API
    does (it used to be copied as float32)."""
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    write_checkpoint(src, {"a.weight": np.ones((8, 64), np.float32), "b.weight": np.ones((8, 40), np.float32)})
    rc, out, err = run(["quantize", src, "-o", dst, "--granularity", "per_group", "--group-size", "32",
                        "--mode", "weight_only"], capsys)
    assert rc == 0, err
    assert "of which per_channel (K not a multiple of 32)" in out
    with SafetensorsReader(dst) as r:
        layers = json.loads(r.metadata[KEY_LAYERS])
        assert r.tensor("a.weight_scale").shape == (8, 2) and "b.weight" not in r.infos
        assert layers["a"]["mode"] == "weight_only" and layers["b"]["granularity"] == "per_channel"
        assert r.tensor("b.weight_scale").shape == (8,)


def test_report_float_and_quantized(tmp_path, capsys):
    arrays = _arrays()
    arrays["bad.weight"] = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
    arrays["bad.weight"][0, 0] = 500.0                          # an outlier: the worst layer per-tensor
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    write_checkpoint(src, arrays)
    rc, out, _ = run(["report", src, "--granularity", "per_tensor"], capsys)
    assert rc == 0
    lines = out.splitlines()
    assert lines[3].startswith("bad ")                          # sorted worst first
    assert "SQNR dB" in lines[1] and "cosine" in lines[1]
    assert run(["quantize", src, "-o", dst, "-q"], capsys)[0] == 0
    rc, out, _ = run(["report", dst], capsys)
    assert rc == 0 and "--reference" in out
    rc, out, _ = run(["report", dst, "--reference", src, "--top", "2"], capsys)
    assert rc == 0 and len(out.splitlines()) == 5
    rc, _, err = run(["report", dst, "--reference", src, "--top", "-1"], capsys)  # was: the best row dropped
    assert rc == 2 and "--top must be >= 0" in err
    nan = dict(arrays)
    nan["bad.weight"] = arrays["bad.weight"].copy()
    nan["bad.weight"][1, 1] = np.nan
    write_checkpoint(tmp_path / "nan.safetensors", nan)
    rc, _, err = run(["report", dst, "--reference", tmp_path / "nan.safetensors"], capsys)
    assert rc == 2 and "holds NaN or Inf" in err and err.count("\n") == 1


def test_info_and_bench_help(capsys):
    rc, out, _ = run(["info"], capsys)
    assert rc == 0 and cquant.isa() in out and "threads" in out
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--help"])
    assert e.value.code == 0
    assert "usage" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing", "not_safetensors", "truncated", "nonfloat_include", "nan",
                                  "already_quantized", "bad_group", "bad_option"])
def test_errors_one_line_exit_2_no_output_file(tmp_path, capsys, case):
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    arrays = _arrays()
    extra = []
    if case == "missing":
        src = tmp_path / "nope.safetensors"
    elif case == "not_safetensors":
        src.write_text("this is not a checkpoint at all")
    elif case == "truncated":
        write_checkpoint(src, arrays)
        data = src.read_bytes()
        src.write_bytes(data[:-50])
    elif case == "nonfloat_include":
        write_checkpoint(src, arrays)
        extra = ["--include", "*position_ids"]
    elif case == "nan":
        arrays["layer.0.fc1.weight"][3, 3] = np.nan
        write_checkpoint(src, arrays)
    elif case == "already_quantized":
        write_checkpoint(tmp_path / "f.safetensors", arrays)
        assert cli.main(["quantize", str(tmp_path / "f.safetensors"), "-o", str(src), "-q"]) == 0
        capsys.readouterr()
    elif case == "bad_group":
        write_checkpoint(src, arrays)
        extra = ["--granularity", "per_group"]
    elif case == "bad_option":
        write_checkpoint(src, arrays)
        extra = ["--mode", "int4"]
    rc, out, err = run(["quantize", src, "-o", dst] + extra, capsys)
    assert rc == 2
    assert err.startswith("cquant: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert not dst.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # no temp file left


def test_python_m_cquant_subprocess(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cquant", "quantize", str(tmp_path / "missing.safetensors"),
                        "-o", str(tmp_path / "o.safetensors")], capture_output=True, text=True, env=ENV)
    assert r.returncode == 2 and r.stderr.strip().startswith("cquant: error:") and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "cquant", "info"], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0 and "ISA in use" in r.stdout


_RSS_CHILD = r"""
import json, sys
import numpy as np
import cquant.cli


def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])          # KiB


base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:    # reset the high-water mark VmHWM to the current RSS
    f.write("5")
rc = cquant.cli.main(["quantize", sys.argv[1], "-o", sys.argv[2], "-q", "--no-progress"])
print(json.dumps({"rc": rc, "base_kib": base, "peak_kib": status("VmHWM")}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to measure peak RSS")
def test_quantize_streams_with_bounded_peak_rss(tmp_path):
    """A 192 MiB checkpoint of 48 tensors of 4 MiB: peak RSS grows by a few tensors, not by the file."""
    src, dst = tmp_path / "big.safetensors", tmp_path / "big_q.safetensors"
    n_tensors, shape = 48, (1024, 1024)
    rng = np.random.default_rng(0)
    block = rng.standard_normal(shape).astype(np.float32)
    names = [f"layers.{i}.fc.weight" for i in range(n_tensors)]
    with open(src, "wb") as f:
        w = StreamWriter(f, [(n, "F32", shape) for n in names])
        for i, n in enumerate(names):
            block[0, 0] = i                                      # distinct tensors, cheaply
            w.write(n, block)
        w.close()
    del block
    file_mib = os.path.getsize(src) / 2**20
    tensor_mib = 4 * shape[0] * shape[1] / 2**20
    r = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(src), str(dst)], capture_output=True, text=True,
                       env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["rc"] == 0
    grew_mib = (res["peak_kib"] - res["base_kib"]) / 1024
    print(f"file {file_mib:.0f} MiB, largest tensor {tensor_mib:.0f} MiB, RSS grew {grew_mib:.1f} MiB")
    assert grew_mib < 4 * tensor_mib, grew_mib           # a small multiple of the largest tensor
    assert grew_mib < file_mib / 8
    with SafetensorsReader(dst) as rd:
        assert len(rd.infos) == 2 * n_tensors
        assert os.path.getsize(dst) < 0.26 * os.path.getsize(src)


def test_closed_stdout_and_stderr(tmp_path):
    """From cron or a daemon (`>&-`): stdout was None and the final flush raised AttributeError (rc 1
    after a complete write); with stderr closed --progress wrote to None (no output at all)."""
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    write_checkpoint(src, _arrays())
    base = [sys.executable, "-m", "cquant"]
    for cmd, redirect in ((["info"], {"stdout": subprocess.DEVNULL}),
                          (["quantize", str(src), "-o", str(out)], {"stdout": subprocess.DEVNULL}),
                          (["quantize", str(src), "-o", str(out), "--progress"], {"stderr": subprocess.DEVNULL})):
        closed = "1" if "stdout" in redirect else "2"
        r = subprocess.run(["sh", "-c", f'exec "$@" {closed}>&-', "sh"] + base + cmd, env=ENV, timeout=120,
                           **redirect)
        assert r.returncode == 0, (cmd, closed)
    assert cquant.load(str(out), build=False).layers


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGHUP"), reason="POSIX signals")
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_terminated_quantize_leaves_no_temporary_file(tmp_path, signame):
    """SIGTERM (timeout, kill, systemd) / SIGHUP stopped `cquant quantize` with its hidden
    .OUT.safetensors.*.tmp left in the folder; they now end it as an error does (128 + signal)."""
    import signal
    import time
    rng = np.random.default_rng(0)
    src = tmp_path / "in.safetensors"
    write_checkpoint(src, {f"l{i}.weight": rng.standard_normal((1024, 1024)).astype(np.float32) for i in range(48)})
    outdir = tmp_path / "out"
    outdir.mkdir()
    p = subprocess.Popen([sys.executable, "-m", "cquant", "quantize", str(src), "-o", str(outdir / "q.safetensors"),
                          "--no-progress"], env=dict(ENV, CQUANT_NUM_THREADS="2"),  # a kernel-pool thread
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)          # may take the signal
    t0 = time.time()
    while not os.listdir(outdir) and p.poll() is None and time.time() - t0 < 60:
        time.sleep(0.002)
    if p.poll() is not None:
        pytest.skip("the command finished before the signal could be sent")
    p.send_signal(getattr(signal, signame))
    _, err = p.communicate(timeout=60)
    if p.returncode == 0:
        pytest.skip("the command finished before the signal arrived")
    assert p.returncode == 128 + getattr(signal, signame), err
    assert b"terminated" in err
    assert os.listdir(outdir) == []
