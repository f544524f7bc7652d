"""qkit: quantizers for LLM weights and vector search.

One idea carries the package: a quantizer is a grid plus a way of choosing
points on it, and the same grids serve LLM weights and search vectors.
Subpackages: qkit.ext (compiled kernels), qkit.ann (index), qkit.eval
(harness and benchmarks), qkit.cli (the `qkit` command).

Importing qkit is cheap: heavy dependencies (torch, numba, faiss) load only in
the modules that use them.
"""
import logging

from qkit._version import __version__
from qkit.errors import QkitError

logging.getLogger("qkit").addHandler(logging.NullHandler())

__all__ = ["__version__", "QkitError"]
