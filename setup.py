"""Build script: the package metadata lives in pyproject.toml; this file only adds the cffi
extension (cbridge/build_native.py compiles csrc/ into cquant._native)."""
from setuptools import setup

setup(cffi_modules=["cbridge/build_native.py:ffibuilder"])
