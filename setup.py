"""Build script. The package is pure Python today; compiled extensions (csrc/) are added here,
each built only where its toolchain exists, so that `pip install -e .` keeps working on CPU-only
machines."""
from setuptools import setup

setup()
