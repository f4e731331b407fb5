"""Build script: the package metadata lives in pyproject.toml; this file only adds the cffi
extension (cbridge/build_native.py compiles csrc/ into cquant._native)."""
import sys
import sysconfig

from setuptools import setup

# The extension uses only the stable ABI (cffi builds _native.abi3.so, see PY_LIMITED_API in
# cbridge/build_native.py): one wheel, tagged cp39-abi3, for every CPython >= 3.9. A debug or
# free-threaded CPython has no stable ABI, so its wheel gets the ordinary cpXY tag.
ABI3 = not (hasattr(sys, "gettotalrefcount") or sysconfig.get_config_var("Py_GIL_DISABLED"))

setup(
    cffi_modules=["cbridge/build_native.py:ffibuilder"],
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ABI3 else {},
)
