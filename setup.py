"""Build hook: compiles the cffi hot-path module (see build_native.py)."""

from setuptools import setup

setup(cffi_modules=["build_native.py:ffibuilder"])
