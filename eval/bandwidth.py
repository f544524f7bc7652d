"""Memory bandwidth of one core: a streaming copy and a streaming read, the ceiling a memory-bound scan can reach.

    qkit bench bandwidth [--mb 256] [--repeat 5] [--json PATH]

Both work on buffers of `mb` MB (far larger than any cache), one thread, best
of `repeat` runs, as McCalpin's STREAM does:

- copy: ``np.copyto(dst, src)`` (glibc memcpy). GB/s counts the bytes read
  plus the bytes written, STREAM's convention for its Copy kernel (the extra
  read a write-allocate costs is not counted, as in STREAM).
- read: a compiled sum over the buffer as uint64 words (Numba; the loop
  vectorizes, so the core out-runs memory and the time is the memory's). GB/s
  counts the bytes read. This is the ceiling for a scan that reads its operand
  once, such as qkit's int8/int4/1-bit kernels (bench_kernels' GB/s column
  counts those bytes the same way).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def sum_u64(a):
    """Wrapping integer sum: every word is read once, nothing is written."""
    s = np.uint64(0)
    for i in range(a.shape[0]):
        s += a[i]
    return s


def _best_s(fn, repeat: int) -> float:
    fn()  # warm-up: page faults, JIT compilation
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(mb: float = 256, repeat: int = 5) -> dict:
    """{'copy_gbps', 'read_gbps', 'mb', 'repeat'}: one-thread streaming bandwidth (1 GB = 1e9 bytes)."""
    if mb <= 0 or repeat < 1:
        from qkit.errors import UsageError

        raise UsageError(f"need mb > 0 and repeat >= 1; got mb={mb}, repeat={repeat}")
    n = max(1, int(mb * 1e6) // 8)
    src = np.arange(n, dtype=np.uint64)  # written once, so every page is really mapped
    dst = np.empty_like(src)
    copy_s = _best_s(lambda: np.copyto(dst, src), repeat)
    read_s = _best_s(lambda: sum_u64(src), repeat)
    return {"copy_gbps": 2 * src.nbytes / copy_s / 1e9, "read_gbps": src.nbytes / read_s / 1e9,
            "mb": src.nbytes / 1e6, "repeat": repeat}


def main(argv=None) -> dict:
    from qkit.eval import machine
    from qkit.fileio import atomic_write

    ap = argparse.ArgumentParser(prog="qkit bench bandwidth", description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=256, help="buffer size in MB (default 256)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", metavar="PATH")
    a = ap.parse_args(argv)
    if a.mb <= 0 or a.repeat < 1:
        ap.error("--mb must be > 0 and --repeat >= 1")
    rec = {**measure(a.mb, a.repeat), "machine": machine.describe()}
    # other jobs share the memory bus: record how busy the machine was, so a low figure can be read as such
    rec["load_average_1m"] = round(os.getloadavg()[0], 2)
    print(f"streaming copy {rec['copy_gbps']:.2f} GB/s, streaming read {rec['read_gbps']:.2f} GB/s "
          f"(one thread, {rec['mb']:.0f} MB buffers, best of {a.repeat})")
    if a.json:
        with atomic_write(a.json, "w") as f:
            json.dump(rec, f, indent=1)
    return rec


if __name__ == "__main__":
    main()
