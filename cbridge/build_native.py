"""cffi build script: compiles csrc/ into the extension module ``cquant._native``.

Out-of-line API mode. The ``cdef`` is produced by running the C preprocessor over the public header
(``csrc/include/cquant.h`` with ``CQ_CDEF`` defined, which drops the system includes), so prototypes
are never copied by hand; integer ``#define`` constants are carried over by a small parser.
Used by setup.py (``cffi_modules``) and runnable on its own: ``python cbridge/build_native.py``.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import sysconfig

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# setuptools wants source paths relative to the project root (where setup.py runs).
_REL = os.path.relpath(ROOT) if os.path.abspath(os.getcwd()) == ROOT else ROOT
CSRC = os.path.join(_REL, "csrc")
HEADER = os.path.join(ROOT, "csrc", "include", "cquant.h")
MANIFEST = os.path.join(ROOT, "csrc", "sources.txt")


def read_manifest(path: str = MANIFEST) -> list[str]:
    """Source paths (relative to csrc/) listed in csrc/sources.txt, the manifest the Makefile reads
    too (pure; unit-tested)."""
    with open(path, encoding="utf-8") as f:
        return [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]


SOURCES = [os.path.join(CSRC, *f.split("/")) for f in read_manifest()]


def _preprocessor() -> list[str]:
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    return shlex.split(cc)[:1] + ["-E", "-P", "-DCQ_CDEF"]


def int_defines(text: str) -> list[str]:
    """``#define NAME <integer>`` lines of a header, as cffi ``cdef`` lines (pure; unit-tested)."""
    return [
        f"#define {m.group(1)} {m.group(2)}"
        for m in re.finditer(r"^#define\s+(CQ_\w+)\s+(-?\d+)\s*$", text, re.M)
    ]


def make_cdef(header: str = HEADER) -> str:
    out = subprocess.run(_preprocessor() + [header], check=True, capture_output=True, text=True).stdout
    with open(header, encoding="utf-8") as f:
        defines = int_defines(f.read())
    return out + "\n" + "\n".join(defines) + "\n"


# Loops start on 64-byte boundaries where the compiler takes the flag (GCC; clang >= 13): the same
# int8 tile measured 4-5% slower on Zen 3 when an unrelated change moved its k loop 16 bytes off
# ((4096, 4096) M = 64 / 256, 2026-12-01: 0.945-0.962 against the 64-aligned build, 0.99 once both
# were aligned), which also made A/B comparisons of builds measure where their loops landed.
ALIGN_FLAGS = ["-falign-loops=64"]


def _accepts(flags: list[str]) -> bool:
    cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    try:
        r = subprocess.run(cc[:1] + flags + ["-Werror", "-x", "c", "-c", "-o", os.devnull, "-"],
                           input="int cq_probe;\n", capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


# The stable ABI (Py_LIMITED_API): the module is built as _native.abi3.so and setup.py tags the
# wheel cp39-abi3, one wheel for every CPython >= 3.9. Not where CPython has no stable ABI, debug and
# free-threaded builds (there py_limited_api=False also keeps cffi's C code from defining it).
PY_LIMITED_API = not (hasattr(sys, "gettotalrefcount") or sysconfig.get_config_var("Py_GIL_DISABLED"))

ffibuilder = FFI()
ffibuilder.cdef(make_cdef())
ffibuilder.set_source(
    "cquant._native",
    '#include "cquant.h"',
    sources=SOURCES,
    include_dirs=[os.path.join(CSRC, "include"), os.path.join(CSRC, "src")],
    # -O3 but never -ffast-math (the numerics contract needs IEEE division and rounding) and
    # never -march=native: ISA-specific code is selected at run time (csrc/cq_dispatch.c).
    extra_compile_args=["-O3", "-std=c99", "-D_GNU_SOURCE", "-fno-strict-aliasing"]
    + (ALIGN_FLAGS if _accepts(ALIGN_FLAGS) else [])
    + shlex.split(os.environ.get("CQUANT_CFLAGS", "")),
    extra_link_args=shlex.split(os.environ.get("CQUANT_LDFLAGS", "")),
    libraries=["m", "pthread", "dl"] if sys.platform != "win32" else [],
    py_limited_api=PY_LIMITED_API,
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=os.path.join(ROOT, "build", "cffi"), verbose=True)
