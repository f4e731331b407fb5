"""The Python package refuses a compiled core of another version (a stale in-place build) with a
clear ImportError, instead of running kernels whose contract may have changed.

Two simulations, each in a fresh interpreter so this process's cquant is untouched:
  - a fake ``cquant._native`` placed in sys.modules that reports another version;
  - the real compiled extension next to a copy of the Python sources whose __version__ differs
    (exactly what a `git pull` without a rebuild produces)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import cquant

PKG_DIR = os.path.dirname(os.path.abspath(cquant.__file__))
ROOT_OF_PKG = os.path.dirname(PKG_DIR)


def _run(code: str, pythonpath: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=pythonpath)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=120)


def test_fake_native_of_another_version_is_refused():
    res = _run("""
        import sys, types
        class _Lib:
            @staticmethod
            def cq_version():
                return b"9.8.7"
        class _Ffi:
            @staticmethod
            def string(s):
                return s
        fake = types.ModuleType("cquant._native")
        fake.ffi, fake.lib = _Ffi(), _Lib()
        sys.modules["cquant._native"] = fake
        try:
            import cquant
        except ImportError as exc:
            print("REFUSED:", exc)
        else:
            print("IMPORTED", cquant.__version__)
        """, ROOT_OF_PKG)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert out.startswith("REFUSED:"), out
    assert "9.8.7" in out and cquant.__version__ in out  # names both versions
    assert "stale" in out and "make" in out              # and says what to do


def test_stale_build_next_to_newer_sources_is_refused(tmp_path):
    stale = tmp_path / "cquant"
    shutil.copytree(PKG_DIR, stale, ignore=shutil.ignore_patterns("__pycache__"))
    init = stale / "__init__.py"
    text = init.read_text()
    assert f'__version__ = "{cquant.__version__}"' in text
    init.write_text(text.replace(f'__version__ = "{cquant.__version__}"', '__version__ = "99.0.0"'))
    res = _run("""
        try:
            import cquant
        except ImportError as exc:
            print("REFUSED:", exc)
        else:
            print("IMPORTED", cquant.__file__)
        """, str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("REFUSED:"), res.stdout
    assert "99.0.0" in res.stdout and cquant.__version__ in res.stdout


def test_matching_versions_import_and_agree():
    assert cquant._native_version == cquant.__version__
    res = _run("import cquant; print(cquant.__version__, cquant.isa())", ROOT_OF_PKG)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[0] == cquant.__version__
