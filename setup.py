"""setuptools entry point. All metadata lives in pyproject.toml.

The package is pure Python (Triton kernels are compiled at run time), so `pip install -e .`
works on a machine without CUDA.
"""
from setuptools import setup

setup()
