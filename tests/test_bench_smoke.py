"""Smoke tests of the benchmark harness (cquant.bench), so `make bench` cannot rot.

They run the real harness (parent + one measuring child process) in --quick mode on one tiny shape;
they check structure, not speed.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import re

import pytest

from cquant import bench


def _cquant_ops_available() -> bool:
    try:
        from cquant import ops  # noqa: F401
    except Exception:
        return False
    return True


def _cquant_feature(name: str):
    """cquant.last_kernel / cquant.ops.peak_gmacs where this build has them, else None."""
    try:
        import cquant
        from cquant import ops
    except Exception:
        return None
    return getattr(cquant if name == "last_kernel" else ops, name, None)


def _table(text: str, title: str) -> list:
    """The data rows (cells) of the markdown table that follows the line starting with title."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(title))
    i = next(j for j in range(start, len(lines)) if lines[j].startswith("| "))
    rows = []
    for ln in lines[i + 2:]:  # skip the header and the |---| line
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip("|").split("|")])
    return rows


def _check_kernel_and_peak(text: str, report: dict, hidden: bool = False) -> None:
    """The micro-kernel and %-of-peak tables and their JSON, with ?/n/a where cquant lacks the API."""
    meta = report["meta"]
    lines = text.splitlines()
    assert lines[0].startswith("CPU: ") and lines[1].startswith("cquant ISA: ")  # the report's top
    assert meta["cpu"] and meta["cquant_isa"]
    rows = report["results"]
    kern_rows = _table(text, "Micro-kernels that ran")
    peak_rows = _table(text, "% of measured peak (int8 ")
    assert len(kern_rows) == len({(r["K"], r["N"], r["M"]) for r in rows}) and len(peak_rows) == len(rows)
    if not _cquant_ops_available():
        return
    have_kernel = _cquant_feature("last_kernel") is not None and not hidden
    have_peak = _cquant_feature("peak_gmacs") is not None and not hidden
    peaks = meta["peak_gmacs"]["1"]
    for kind in ("int8", "f32"):
        if have_peak:
            assert isinstance(peaks[kind], float) and peaks[kind] > 0, peaks
        else:
            assert peaks[kind] is None
    for r in rows:
        for key in ("cquant_wo", "cquant_dyn"):
            c = r["contenders"][key]
            assert c["gmacs"] > 0
            if have_kernel:
                assert isinstance(c["kernel"], str) and c["kernel"] and not c["kernel"].startswith("error"), c
            else:
                assert c["kernel"] is None
            if have_peak:
                assert c["pct_of_peak"] > 0
            else:
                assert c["pct_of_peak"] is None
    for cells in kern_rows:
        for cell in cells[2:]:
            assert (cell != "?" and cell) if have_kernel else cell == "?"
    for cells in peak_rows:
        for cell in cells[3:]:
            assert re.fullmatch(r"\d+\.\d% \(\d+\.\d\)" if have_peak else r"n/a \(\d+\.\d\)", cell), cell
    if not have_peak:
        assert "peak n/a GMAC/s/core" in text


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
    _check_kernel_and_peak(text, report)


def test_quick_kernel_and_peak_fallbacks(tmp_path, capsys, monkeypatch):
    # As on a cquant without last_kernel() / ops.peak_gmacs(): the tables say ? and n/a, nothing fails.
    monkeypatch.setenv("CQUANT_BENCH_HIDE", "torch,onnxruntime,last_kernel,peak_gmacs")
    text, report = _run(tmp_path, capsys, "--contenders", "cquant_wo,cquant_dyn", "--no-quant-time")
    _check_kernel_and_peak(text, report, hidden=True)


@pytest.mark.skipif(not _cquant_ops_available(), reason="cquant.ops not importable")
def test_child_records_kernel_and_peak(monkeypatch):
    # In-process child with stand-ins for the two functions: checks the plumbing and the arithmetic.
    import cquant
    from cquant import ops
    monkeypatch.delenv("CQUANT_BENCH_HIDE", raising=False)
    monkeypatch.setattr(cquant, "last_kernel", lambda: "fake_6x64c4", raising=False)
    monkeypatch.setattr(ops, "peak_gmacs", lambda kind: {"int8": 200.0, "f32": 50.0}[kind], raising=False)
    args = bench._resolve(bench.build_parser().parse_args(
        ["--quick", "--shapes", "64x32", "--M", "2", "--contenders", "cquant_wo,cquant_dyn",
         "--child", "--child-threads", "1"]))
    threads, level = cquant.get_num_threads(), logging.getLogger().level
    try:  # run_child sets process-wide state: cquant's thread count, the root logger's level
        data = bench.run_child(args)
    finally:
        cquant.set_num_threads(threads)
        logging.getLogger().setLevel(level)
    peaks = data["meta"]["peak_gmacs"]
    # on an AMX machine the AMX (tdpbssd) peak is measured too; the stand-in returns the same
    assert peaks == ({"int8": 200.0, "f32": 50.0, "amx": 200.0} if cquant.isa() == "amx"
                     else {"int8": 200.0, "f32": 50.0})
    (row,) = data["results"]
    for key, peak in (("cquant_wo", 50.0), ("cquant_dyn", 200.0)):
        c = row["contenders"][key]
        assert c["kernel"] == "fake_6x64c4"
        assert c["gmacs"] == pytest.approx(64 * 32 * 2 / (c["median_ms"] / 1e3) / 1e9)
        assert c["pct_of_peak"] == pytest.approx(100 * c["gmacs"] / peak)
    data["meta"].update(cpu="x", nproc=1, python="3", versions={}, openblas_env={}, cquant_isa="avx512vnni",
                        peak_gmacs={"1": data["meta"]["peak_gmacs"]})
    text = bench.format_tables({"meta": data["meta"], "contenders": args.contenders,
                                "results": data["results"], "quant_time": None})
    assert "int8 vpdpbusd peak 200.0 GMAC/s/core" in text and "f32 FMA peak 50.0 GMAC/s/core" in text
    assert _table(text, "Micro-kernels that ran") == [["64x32", "2", "fake_6x64c4", "fake_6x64c4"]]


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
