"""Kernel throughput: qkit's int8 scans against numpy, BLAS and torch, one thread each.

    python -m qkit.eval.bench_kernels [--rows 1000000] [--dim 128] [--repeat 7] [--json PATH]

Scans `rows` int8 vectors of `dim` bytes (128 MB by default: larger than any
cache, so this measures the memory-bound regime a vector index lives in)
against one query, with every qkit backend, and with the baselines a user
would otherwise reach for: numpy int32 matmul (rows pre-widened), numpy float32
BLAS matvec (rows pre-converted) and torch float32 mv. Times are the best of
`repeat` runs; GB/s counts the bytes of the operand each method reads; the
ratio is numpy float32 BLAS time / this time (higher is faster).
A second table runs the blocked many-against-many kernel against float32 GEMM.
"""
from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one thread, all methods
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from qkit import ext  # noqa: E402
from qkit.eval import machine  # noqa: E402
from qkit.fileio import atomic_write  # noqa: E402


def best_ms(fn, repeat: int) -> float:
    fn()  # warm-up: JIT compilation, page faults
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts) * 1e3


def qkit_backends() -> list[tuple[str, str | None]]:
    out = []
    if ext.native_available():
        if ext.best_isa() == "avx2":
            out.append(("native", "avx2"))
        out.append(("native", "scalar"))
    out.append(("numba", None))
    return out


def run(rows: int, dim: int, repeat: int, many_queries: int, many_rows: int, seed: int = 0) -> list[dict]:
    import torch

    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    X = rng.integers(-128, 128, size=(rows, dim), dtype=np.int8)
    U = rng.integers(0, 256, size=(rows, dim), dtype=np.uint8)
    q = rng.integers(-128, 128, size=dim, dtype=np.int8)
    records: list[dict] = []

    def rec(kernel, backend, ms, nbytes, n, **extra):
        records.append({"kernel": kernel, "backend": backend, "ms": ms, "gbps": nbytes / ms / 1e6, "rows": n,
                        "dim": dim, "vectors_per_s": n / ms * 1e3, **extra})

    for kernel, fn, data in [("dot_i8", ext.dot, X), ("l2_i8", ext.l2sq, X), ("dot_u8i8", ext.dot, U)]:
        for backend, isa in qkit_backends():
            ms = best_ms(lambda: fn(q, data, backend=backend, isa=isa), repeat)
            rec(kernel, backend + (f"-{isa}" if isa else ""), ms, data.nbytes, rows)

    # baselines on the same int8 rows
    X32 = X.astype(np.int32)
    q32 = q.astype(np.int32)
    rec("dot_i8", "numpy-int32-matmul", best_ms(lambda: X32 @ q32, repeat), X32.nbytes, rows)
    del X32
    Xf = X.astype(np.float32)
    qf = q.astype(np.float32)
    rec("dot_i8", "numpy-f32-blas", best_ms(lambda: Xf @ qf, repeat), Xf.nbytes, rows)
    tX, tq = torch.from_numpy(Xf), torch.from_numpy(qf)
    with torch.inference_mode():
        rec("dot_i8", "torch-f32-mv", best_ms(lambda: torch.mv(tX, tq), repeat), Xf.nbytes, rows)
    del Xf, tX
    blas = {r["kernel"]: r["ms"] for r in records if r["backend"] == "numpy-f32-blas"}
    for r in records:
        r["ratio_vs_f32_blas"] = blas["dot_i8"] / r["ms"]

    # many-against-many: queries x rows, compared with float32 GEMM
    Q = X[:many_queries].copy()
    Y = X[many_queries:many_queries + many_rows].copy()
    many = []
    for backend, isa in qkit_backends():
        ms = best_ms(lambda: ext.dot_many(Q, Y, backend=backend, isa=isa), max(1, repeat // 2))
        many.append(("dot_many_i8", backend + (f"-{isa}" if isa else ""), ms))
    Qf, Yf = Q.astype(np.float32), Y.astype(np.float32)
    many.append(("dot_many_i8", "numpy-f32-gemm", best_ms(lambda: Qf @ Yf.T, max(1, repeat // 2))))
    gemm = many[-1][2]
    for kernel, backend, ms in many:
        records.append({"kernel": kernel, "backend": backend, "ms": ms, "rows": many_rows, "queries": many_queries,
                        "dim": dim, "gbps": Y.nbytes / ms / 1e6, "vectors_per_s": many_queries * many_rows / ms * 1e3,
                        "ratio_vs_f32_blas": gemm / ms})
    return records


def print_table(records: list[dict], info: dict) -> None:
    print(f"machine: {info['cpu']}; {info['cores']} cores; flags: {' '.join(info['flags'])}")
    print(f"qkit backend: {ext.default_backend()} (best ISA {ext.best_isa()}); numpy {info['numpy']}; one thread")
    for b in info.get("blas", []):
        print(f"blas: {b}")
    print()
    head = f"{'kernel':12s} {'backend':20s} {'ms':>9s} {'GB/s':>7s} {'Mvec/s':>9s} {'x f32 BLAS':>10s}"
    print(head)
    print("-" * len(head))
    for r in records:
        print(f"{r['kernel']:12s} {r['backend']:20s} {r['ms']:9.2f} {r['gbps']:7.2f} "
              f"{r['vectors_per_s'] / 1e6:9.1f} {r['ratio_vs_f32_blas']:10.2f}")


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m qkit.eval.bench_kernels", description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--many-queries", type=int, default=256)
    ap.add_argument("--many-rows", type=int, default=100_000)
    ap.add_argument("--json", metavar="PATH", help="also write the records as a JSON list")
    a = ap.parse_args(argv)
    if a.rows < 1 or a.dim < 1 or a.repeat < 1:
        ap.error("--rows, --dim and --repeat must be >= 1")
    many_q = min(a.many_queries, a.rows)
    many_r = max(1, min(a.many_rows, a.rows - many_q))
    info = machine.describe()
    records = run(a.rows, a.dim, a.repeat, many_q, many_r)
    print_table(records, info)
    if a.json:
        with atomic_write(a.json, "w") as f:
            json.dump([{**r, "machine": info} for r in records], f, indent=1)
    return records


if __name__ == "__main__":
    main()
