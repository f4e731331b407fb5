"""Build script: the package metadata lives in pyproject.toml; this file only adds the cffi
extension (cbridge/build_native.py compiles csrc/ into cquant._native)."""
from setuptools import setup

setup(
    cffi_modules=["cbridge/build_native.py:ffibuilder"],
    # the extension uses only the stable ABI (cffi builds _native.abi3.so): one wheel for every
    # CPython >= 3.9
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
