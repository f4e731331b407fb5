"""The wheel: built with build isolation from pyproject's build requirements alone, installed into a
fresh virtual environment (no source tree on sys.path, run from a temporary directory), and
smoke-tested on every ISA path the CPU has, forced with CQUANT_ISA. Forcing `scalar` shows the
wheel works on an x86-64 without AVX2, forcing `avx2` one without AVX-512.

About 30 s (a compile and a venv), so part of `make test`; CQUANT_SKIP_WHEEL=1 skips it.
  pytest tests/test_wheel.py                           builds a wheel from a copy of the sources
  CQUANT_WHEEL=path/to.whl pytest tests/test_wheel.py  tests a prebuilt wheel (`make test-wheel`
                                                       does this with the one `make wheel` built)
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEEL = os.environ.get("CQUANT_WHEEL", "")
pytestmark = pytest.mark.skipif(os.environ.get("CQUANT_SKIP_WHEEL") == "1", reason="CQUANT_SKIP_WHEEL=1")

TIMEOUT = 900

SMOKE = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import cquant
    from cquant import ops
    here = os.path.dirname(os.path.abspath(cquant.__file__))
    rng = np.random.default_rng(0)
    w = rng.standard_normal((40, 72)).astype(np.float32)
    x = rng.standard_normal((5, 72)).astype(np.float32)
    b = rng.standard_normal(40).astype(np.float32)
    out = {"file": here, "version": cquant.__version__, "isa": cquant.isa(),
           "available": cquant.available_isas(), "sys_path": sys.path}
    for gran, gs in [("per_channel", None), ("per_group", 24), ("per_tensor", None)]:
        qw = ops.quantize_weight(w, granularity=gran, group_size=gs)
        deq = ops.dequantize(qw)
        # numerics contract: codes and scales as numpy computes them
        if gran == "per_channel":
            s = (np.abs(w).max(axis=1) / np.float32(127)).astype(np.float32)
            q = np.clip(np.round(w / s[:, None]), -127, 127).astype(np.int8)
            assert np.array_equal(qw.q, q) and np.array_equal(qw.scale, s)
        ref = x @ deq.T + b
        for mode in ("weight_only", "dynamic"):
            y = ops.linear(x, qw, b, mode=mode)
            tol = 1e-4 if mode == "weight_only" else 0.05 * np.abs(ref).max()
            assert y.shape == (5, 40) and y.dtype == np.float32
            assert np.abs(y - ref).max() <= tol, (gran, mode, float(np.abs(y - ref).max()))
    a = rng.integers(-127, 128, (3, 50), dtype=np.int8)
    bb = rng.integers(-127, 128, (7, 50), dtype=np.int8)
    assert np.array_equal(ops.gemm_s8s8s32(a, bb), a.astype(np.int64) @ bb.astype(np.int64).T)
    try:
        from cquant import Quantizer  # the model layer ships in the wheel too
        out["quantizer"] = Quantizer.__name__
    except Exception as exc:
        out["quantizer"] = "missing: %r" % (exc,)
    print(json.dumps(out))
""")


def _run(cmd, **kw):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, **kw)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def wheel_path(tmp_path_factory):
    if WHEEL:
        assert os.path.isfile(WHEEL), f"CQUANT_WHEEL={WHEEL} does not exist"
        return WHEEL
    # Build from a copy of the sources, so the shared work tree's build/ is left alone and only
    # what the build declares is used (pip's default build isolation: pyproject's requirements).
    src = tmp_path_factory.mktemp("src")
    for name in ("csrc", "cbridge", "python"):
        shutil.copytree(os.path.join(ROOT, name), src / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.o", ".native-stamp", "_native.c"))
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        if os.path.exists(os.path.join(ROOT, name)):
            shutil.copy(os.path.join(ROOT, name), src / name)
    dist = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-w", str(dist)])
    wheels = glob.glob(str(dist / "cquant-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def venv_python(wheel_path, tmp_path_factory):
    venv = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", str(venv)])  # no --system-site-packages
    py = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    _run([py, "-m", "pip", "install", "-q", wheel_path], env=env)  # numpy, cffi: its declared deps
    return py


def test_wheel_contents(wheel_path):
    with zipfile.ZipFile(wheel_path) as zf:
        names = zf.namelist()
    assert any(n.startswith("cquant/_native") and n.endswith(".so") for n in names), names
    # every Python module of the package is in the wheel (subpackages included)
    pkg = os.path.join(ROOT, "python", "cquant")
    tracked = subprocess.run(["git", "ls-files", "python/cquant"], cwd=ROOT, capture_output=True, text=True)
    sources = [p for p in tracked.stdout.split() if p.endswith(".py")] if tracked.returncode == 0 else []
    if not sources:
        sources = [os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(pkg) for f in fs if f.endswith(".py")]
    missing = [p for p in sources if p[len("python/"):] not in names]
    assert not missing, f"modules missing from the wheel: {missing}"
    assert not any(n.endswith((".c", ".o")) or "/tests/" in n for n in names), "build debris in the wheel"
    assert "-linux_x86_64" in wheel_path or "manylinux" in wheel_path or sys.platform != "linux" \
        or os.uname().machine != "x86_64", wheel_path


def _smoke(venv_python, tmp_path, isa=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CQUANT_") and k not in ("PYTHONPATH",)}
    if isa:
        env["CQUANT_ISA"] = isa
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir(exist_ok=True)
    res = _run([venv_python, "-c", SMOKE], cwd=str(run_dir), env=env)
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_installed_wheel_runs_outside_the_source_tree(venv_python, tmp_path):
    out = _smoke(venv_python, tmp_path)
    assert "site-packages" in out["file"] and not out["file"].startswith(ROOT), out["file"]
    assert not any(p.startswith(os.path.join(ROOT, "python")) for p in out["sys_path"])
    assert out["isa"] in out["available"] and "scalar" in out["available"]
    assert out["quantizer"] == "Quantizer", out["quantizer"]


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avxvnni", "avx512", "avx512vnni", "amx"])
def test_installed_wheel_every_isa_path(venv_python, tmp_path, isa):
    available = _smoke(venv_python, tmp_path)["available"]
    if isa not in available:
        pytest.skip(f"{isa} not available on this CPU")
    out = _smoke(venv_python, tmp_path, isa)
    assert out["isa"] == isa


def test_forcing_a_missing_path_is_a_clear_error(venv_python, tmp_path):
    available = _smoke(venv_python, tmp_path)["available"]
    missing = [p for p in ("avx2", "avx512", "avx512vnni", "amx") if p not in available]
    if not missing:
        pytest.skip("this CPU has every path")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["CQUANT_ISA"] = missing[-1]
    res = subprocess.run([venv_python, "-c", "import cquant; cquant.isa()"], cwd=str(tmp_path), env=env,
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode != 0 and "IsaError" in res.stderr, res.stderr
    assert f"CQUANT_ISA={missing[-1]!r}" in res.stderr and "available here" in res.stderr, res.stderr
