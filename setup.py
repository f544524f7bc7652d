"""Build the kernel extension qkit.ext._kernels (Cython over C).

Flags are portable on purpose: AVX2 code lives in functions marked
__attribute__((target("avx2"))) and is chosen at run time, so the build never
uses -march=native (a wheel built here must not crash on an older CPU).
"""
import os

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

extra = ["-O3", "-std=gnu11", "-fno-strict-aliasing", "-Wall"]
if os.environ.get("QKIT_NATIVE") == "1":  # opt-in for local experiments only
    extra.append("-march=native")

ext = Extension(
    "qkit.ext._kernels",
    sources=["ext/_kernels.pyx", "ext/csrc/kernels_int8.c", "ext/csrc/kernels_lowbit.c", "ext/csrc/kernels_w4a8.c",
             "ext/csrc/kernels_w8a8.c", "ext/csrc/pool.c", "ext/csrc/gemm_i8.c", "ext/csrc/cpu.c"],
    include_dirs=["ext/csrc", np.get_include()],
    # -pthread: the runtime kernels' thread pool (pool.c); -ffp-contract=off: no a * b + c fused into an FMA
    # on one path and not another, so every path's float result is the same bits
    extra_compile_args=extra + ["-pthread", "-ffp-contract=off"],
    extra_link_args=["-pthread"],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
)

# The HNSW graph and its codec distances: a second module, threads through pthreads.
hnsw = Extension(
    "qkit.ext._hnsw",
    sources=["ext/_hnsw.pyx", "ext/csrc/hnsw.c", "ext/csrc/codec_dist.c", "ext/csrc/kernels_lowbit.c",
             "ext/csrc/cpu.c"],
    include_dirs=["ext/csrc", np.get_include()],
    extra_compile_args=extra + ["-pthread"],
    extra_link_args=["-pthread"],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
)

setup(ext_modules=cythonize([ext, hnsw], language_level=3, compiler_directives={"boundscheck": False, "wraparound": False}))
