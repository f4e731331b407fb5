"""Smoke tests of the benchmark harness (cquant.bench), so `make bench` cannot rot.

They run the real harness (parent + one measuring child process) in --quick mode on one tiny shape;
they check structure, not speed.
"""
from __future__ import annotations

import importlib.util
import json
import math

import pytest

from cquant import bench


def _cquant_ops_available() -> bool:
    try:
        from cquant import ops  # noqa: F401
    except Exception:
        return False
    return True


def _run(tmp_path, capsys, *extra):
    out_json = tmp_path / "bench.json"
    rc = bench.main(["--quick", "--shapes", "64x32", "--M", "1,3", "--threads", "1",
                     "--quant-shape", "64x32", "--json", str(out_json), *extra])
    assert rc == 0
    text = capsys.readouterr().out
    report = json.loads(out_json.read_text())
    return text, report


def test_quick_without_peers(tmp_path, capsys, monkeypatch):
    # Hide torch and onnxruntime from the child, as on a machine without them.
    monkeypatch.setenv("CQUANT_BENCH_HIDE", "torch,onnxruntime")
    text, report = _run(tmp_path, capsys)

    assert "| K x N | M | thr |" in text
    assert "CPU:" in text and "cquant ISA:" in text
    rows = report["results"]
    assert [(r["K"], r["N"], r["M"], r["threads"]) for r in rows] == [(64, 32, 1, 1), (64, 32, 3, 1)]
    for r in rows:
        c = r["contenders"]
        assert c["numpy"]["status"] == "ok"
        assert c["numpy"]["ratio"] == pytest.approx(1.0)
        assert c["numpy"]["median_ms"] > 0
        assert c["numpy"]["rel_err"] < 1e-5 and c["numpy"]["cos"] > 0.99999
        for key in ("torch_f32", "torch_pt", "torch_pc", "ort_pc"):
            assert c[key]["status"].startswith("not installed"), c[key]
        if _cquant_ops_available():
            for key in ("cquant_wo", "cquant_dyn"):
                assert c[key]["status"] == "ok", c[key]
                assert c[key]["median_ms"] > 0 and math.isfinite(c[key]["ratio"])
            assert c["cquant_wo"]["rel_err"] < 0.05
            assert c["cquant_dyn"]["rel_err"] < 0.1
    assert "not installed" in text
    assert report["meta"]["versions"]["torch"] is None
    assert report["meta"]["threads_seen"]["1"]["openblas"] in (1, None)  # None: BLAS not introspectable
    assert set(report["meta"]["load"]["1"]) >= {"wall_s", "foreign_cpu_fraction"}
    q = report["quant_time"]
    assert q["contenders"]["numpy"]["status"] == "ok"
    if _cquant_ops_available():
        assert q["contenders"]["cquant"]["status"] == "ok"


@pytest.mark.skipif(importlib.util.find_spec("torch") is None and importlib.util.find_spec("onnxruntime") is None,
                    reason="neither torch nor onnxruntime installed")
def test_quick_with_installed_peers(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CQUANT_BENCH_HIDE", raising=False)
    _, report = _run(tmp_path, capsys, "--contenders", "numpy,torch_pc,ort_pc", "--no-quant-time")
    c = report["results"][0]["contenders"]
    have_ort = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None
    for key, present in (("torch_pc", importlib.util.find_spec("torch") is not None), ("ort_pc", have_ort)):
        if present:
            assert c[key]["status"] == "ok", c[key]
            assert c[key]["rel_err"] < 0.1
        else:
            assert c[key]["status"].startswith("not installed")


def test_option_parsing_and_rep_plan():
    p = bench.build_parser()
    a = bench._resolve(p.parse_args(["--shapes", "768x768,4096X11008", "--M", "1,8", "--threads", "2"]))
    assert a.shapes == [(768, 768), (4096, 11008)] and a.M == [1, 8] and a.threads == [2]
    a = bench._resolve(p.parse_args(["--contenders", "cquant_dyn"]))
    assert a.contenders == ["numpy", "cquant_dyn"]  # the baseline is always there
    with pytest.raises(SystemExit):
        p.parse_args(["--shapes", "12"])
    assert bench.plan_reps(1e-5, 0.3, 7) == bench.MAX_REPS
    assert bench.plan_reps(0.01, 0.3, 7) == 30
    assert bench.plan_reps(0.1, 0.3, 7) == 7
    assert bench.plan_reps(1.0, 0.3, 7) == 3  # slow: fewer repetitions
