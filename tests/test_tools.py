"""tools/mca.py (`make mca`): its assembly parser and loop finder on hand-written input (no llvm
needed), and, where llvm-mca is installed, a real prediction for one micro-kernel file."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MCA = os.path.join(ROOT, "tools", "mca.py")


def test_mca_selftest():
    r = subprocess.run([sys.executable, MCA, "--selftest"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(not (shutil.which("llvm-mca") or any(
    os.path.exists(f"/usr/lib/llvm-{v}/bin/llvm-mca") for v in range(11, 21))), reason="llvm-mca not installed")
def test_mca_predicts_the_vnni_tile():
    src = os.path.join(ROOT, "csrc", "x86", "avx512vnni", "qd8-f32-qc8w-gemm-6x64c4-avx512vnni.c")
    r = subprocess.run([sys.executable, MCA, src, "--cpus", "icelake-server"], capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "icelake-server" in r.stdout and "vpdpbusd" in r.stdout.lower() or "i8dot" in r.stdout


def test_ab_versions_against_itself():
    """tools/ab_versions.py: this checkout against a copy of itself (same outputs, so it runs to the end
    and prints, per cell and mode, the ratio in both import orders and their geometric mean)."""
    import cquant
    pkg = os.path.dirname(os.path.abspath(cquant.__file__))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "ab_versions.py"), pkg, "--seconds", "0",
                        "--shapes", "40x24", "--ms", "1,5"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [ln for ln in r.stdout.splitlines() if " both " in ln]
    assert len(lines) == 4, r.stdout
    assert all(float(ln.split(" both ")[1].split()[0]) > 0 for ln in lines)


def test_ab_versions_inputs(tmp_path):
    """ab_versions.py --inputs: dynamic calls on captured inputs (x, w and the optional x_mul /
    x_hadamard / b), one cell per file, the outputs checked equal between the builds."""
    import numpy as np
    import cquant
    pkg = os.path.dirname(os.path.abspath(cquant.__file__))
    rng = np.random.default_rng(0)
    f1, f2 = str(tmp_path / "plain.npz"), str(tmp_path / "rot.npz")
    x, w = rng.standard_normal((6, 64)).astype(np.float32), rng.standard_normal((20, 64)).astype(np.float32)
    np.savez(f1, x=x, w=w)
    np.savez(f2, x=x, w=w, b=np.ones(20, np.float32), x_mul=np.full(64, 0.5, np.float32), x_hadamard=np.int64(16))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "ab_versions.py"), pkg, "--seconds", "0",
                        "--inputs", f"{f1},{f2}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [ln for ln in r.stdout.splitlines() if " both " in ln]
    assert [ln.split()[0] for ln in lines] == ["plain.npz", "rot.npz"], r.stdout
