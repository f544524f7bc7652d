"""Kernel throughput: qkit's int8 scans against numpy, BLAS and torch, one thread each.

    qkit bench kernels [--rows 1000000] [--dim 128] [--repeat 7] [--lowbit-mb 64] [--json PATH]

Scans `rows` int8 vectors of `dim` bytes (128 MB by default: larger than any
cache, so this measures the memory-bound regime a vector index lives in)
against one query, with every qkit backend, and with the baselines a user
would otherwise reach for: numpy int32 matmul (rows pre-widened), numpy float32
BLAS matvec (rows pre-converted) and torch float32 mv. Times are the best of
`repeat` runs; GB/s counts the bytes of the operand each method reads; the
ratio is numpy float32 BLAS time / this time (higher is faster).
A second table runs the blocked many-against-many kernel against float32 GEMM.

Low-bit scans, each over `lowbit-mb` MB of codes at the same dimension: packed
int4 rows against an int8 and a float32 query, 1-bit Hamming, AND-popcount
with a 4-bit bit-sliced query (RaBitQ's estimator core) and the FastScan LUT
scan (dim / 4 sub-spaces of 4 bits). Their `x int8` column is vectors/s
relative to the int8 dot scan of the same backend.
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


def run_lowbit(dim: int, mb: float, repeat: int, rng: np.random.Generator) -> list[dict]:
    """Low-bit scans over `mb` MB of codes each; records without ratios (filled by the caller)."""
    from qkit import packing

    out = []

    def codes_for(bytes_per_vector: int) -> tuple[int, np.ndarray]:
        n = max(32, int(mb * 1e6) // bytes_per_vector)
        return n, rng.integers(0, 256, size=(n, bytes_per_vector), dtype=np.uint8)

    q8 = rng.integers(-128, 128, size=dim, dtype=np.int8)
    qf = rng.standard_normal(dim).astype(np.float32)
    n4, c4 = codes_for((dim + 1) // 2)
    n1, c1 = codes_for((dim + 7) // 8)
    qbits = c1[0].copy()
    planes = packing.pack_bit_planes(rng.integers(0, 16, size=dim), 4)
    M = max(1, dim // 4)
    nfs = max(32, int(mb * 1e6) // (M // 2 or 1))
    fs = rng.integers(0, 256, size=(-(-nfs // 32), M, 16), dtype=np.uint8)
    lut = rng.integers(0, 256, size=(M, 16), dtype=np.uint8)
    cases = [
        ("int4_dot_i8", lambda b, i: ext.int4_dot(q8, c4, dim, backend=b, isa=i), n4, c4.nbytes),
        ("int4_l2_i8", lambda b, i: ext.int4_l2sq(q8, c4, dim, backend=b, isa=i), n4, c4.nbytes),
        ("int4_dot_f32", lambda b, i: ext.int4_dot(qf, c4, dim, backend=b, isa=i), n4, c4.nbytes),
        ("hamming", lambda b, i: ext.hamming(qbits, c1, backend=b, isa=i), n1, c1.nbytes),
        ("and_popcount_b4", lambda b, i: ext.and_popcount(planes, c1, backend=b, isa=i), n1, c1.nbytes),
        (f"fastscan_m{M}", lambda b, i: ext.fastscan(lut, fs, nfs, backend=b, isa=i), nfs, fs.nbytes),
    ]
    for kernel, fn, n, nbytes in cases:
        for backend, isa in qkit_backends():
            ms = best_ms(lambda: fn(backend, isa), repeat)
            out.append({"kernel": kernel, "backend": backend + (f"-{isa}" if isa else ""), "ms": ms,
                        "gbps": nbytes / ms / 1e6, "rows": n, "dim": dim, "bytes_per_vector": nbytes / n,
                        "vectors_per_s": n / ms * 1e3})
    return out


def run(rows: int, dim: int, repeat: int, many_queries: int, many_rows: int, lowbit_mb: float = 64,
        seed: int = 0) -> list[dict]:
    import torch

    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    X = rng.integers(-128, 128, size=(rows, dim), dtype=np.int8)
    U = rng.integers(0, 256, size=(rows, dim), dtype=np.uint8)
    q = rng.integers(-128, 128, size=dim, dtype=np.int8)
    records: list[dict] = []

    def rec(kernel, backend, ms, nbytes, n, **extra):
        records.append({"kernel": kernel, "backend": backend, "ms": ms, "gbps": nbytes / ms / 1e6, "rows": n,
                        "dim": dim, "bytes_per_vector": nbytes / n, "vectors_per_s": n / ms * 1e3, **extra})

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
    blas = {r["kernel"]: r for r in records if r["backend"] == "numpy-f32-blas"}["dot_i8"]
    records += run_lowbit(dim, lowbit_mb, repeat, rng)
    int8_vps = {r["backend"]: r["vectors_per_s"] for r in records if r["kernel"] == "dot_i8"}
    for r in records:
        # throughput in vectors/s relative to BLAS on the same int8 rows, and to the int8 scan of this backend
        r["ratio_vs_f32_blas"] = r["vectors_per_s"] / blas["vectors_per_s"]
        if r["backend"] in int8_vps:
            r["ratio_vs_int8"] = r["vectors_per_s"] / int8_vps[r["backend"]]

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
                        "dim": dim, "bytes_per_vector": dim, "gbps": Y.nbytes / ms / 1e6,
                        "vectors_per_s": many_queries * many_rows / ms * 1e3, "ratio_vs_f32_blas": gemm / ms})
    return records


def print_table(records: list[dict], info: dict) -> None:
    print(f"machine: {info['cpu']}; {info['cores']} cores; flags: {' '.join(info['flags'])}")
    print(f"qkit backend: {ext.default_backend()} (best ISA {ext.best_isa()}); numpy {info['numpy']}; one thread")
    for b in info.get("blas", []):
        print(f"blas: {b}")
    print()
    head = (f"{'kernel':16s} {'backend':20s} {'B/vec':>6s} {'Mvec':>6s} {'ms':>9s} {'GB/s':>7s} {'Mvec/s':>9s} "
            f"{'x f32 BLAS':>10s} {'x int8':>7s}")
    print(head)
    print("-" * len(head))
    for r in records:
        x8 = f"{r['ratio_vs_int8']:7.2f}" if "ratio_vs_int8" in r else f"{'':7s}"
        print(f"{r['kernel']:16s} {r['backend']:20s} {r['bytes_per_vector']:6.0f} {r['rows'] / 1e6:6.2f} "
              f"{r['ms']:9.2f} {r['gbps']:7.2f} {r['vectors_per_s'] / 1e6:9.1f} {r['ratio_vs_f32_blas']:10.2f} {x8}")


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="qkit bench kernels", description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--many-queries", type=int, default=256)
    ap.add_argument("--many-rows", type=int, default=100_000)
    ap.add_argument("--lowbit-mb", type=float, default=64, help="MB of codes each low-bit scan reads")
    ap.add_argument("--json", metavar="PATH", help="also write the records as a JSON list")
    a = ap.parse_args(argv)
    if a.json and not os.path.isdir(os.path.dirname(os.path.abspath(a.json))):
        ap.error(f"--json {a.json}: its directory does not exist")
    if a.rows < 1 or a.dim < 1 or a.repeat < 1:
        ap.error("--rows, --dim and --repeat must be >= 1")
    many_q = min(a.many_queries, a.rows)
    many_r = max(1, min(a.many_rows, a.rows - many_q))
    info = machine.describe()
    if a.lowbit_mb <= 0:
        ap.error("--lowbit-mb must be > 0")
    records = run(a.rows, a.dim, a.repeat, many_q, many_r, a.lowbit_mb)
    print_table(records, info)
    if a.json:
        with atomic_write(a.json, "w") as f:
            json.dump([{**r, "machine": info} for r in records], f, indent=1)
    return records


if __name__ == "__main__":
    main()
