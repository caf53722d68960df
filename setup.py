"""Build script. Plain `pip install .` needs no CUDA toolkit and builds nothing native.

`csrc/` CUDA extensions are compiled just in time on first use (torch.utils.cpp_extension + ninja).
"""
from setuptools import setup

setup()
