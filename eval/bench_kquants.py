"""GGML quantization throughput per type: qkit against libggml's reference, one thread, same input.

    qkit bench kquants [--mb 16] [--repeat 3] [--json PATH]

Input: Gaussian float32 rows of 4096 (`mb` MB in all). libggml is
llama-cpp-python's libggml-base (quantize_row_<type>_ref through ctypes),
measured only when llama-cpp-python is installed; the ratio column is qkit's
MB/s over libggml's.
"""
from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import ctypes  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from qkit import ggml  # noqa: E402
from qkit.eval import machine  # noqa: E402
from qkit.fileio import atomic_write  # noqa: E402

TYPES = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_K", "q3_K", "q4_K", "q5_K", "q6_K"]


def libggml():
    try:
        import llama_cpp
    except ImportError:
        return None
    return ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))


def best_s(fn, repeat):
    fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def run(mb: float, repeat: int) -> list[dict]:
    rows = max(1, int(mb * 2**20) // (4096 * 4))
    X = np.random.default_rng(0).standard_normal((rows, 4096)).astype(np.float32)
    lib = libggml()
    recs = []
    for t in TYPES:
        s = best_s(lambda: ggml.quantize(X, t), repeat)
        recs.append({"type": t, "impl": "qkit", "mb_per_s": X.nbytes / 2**20 / s, "seconds": s})
        if lib is not None:
            f = getattr(lib, f"quantize_row_{t}_ref")
            f.restype = None
            f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
            bt = ggml.get_type(t)
            out = np.empty(X.size // bt.block_size * bt.type_size, np.uint8)
            s = best_s(lambda: f(X.ctypes.data, out.ctypes.data, X.size), repeat)
            recs.append({"type": t, "impl": "libggml", "mb_per_s": X.nbytes / 2**20 / s, "seconds": s})
    return recs


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="qkit bench kquants", description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", metavar="PATH")
    a = ap.parse_args(argv)
    info = machine.describe()
    recs = run(a.mb, a.repeat)
    print(f"machine: {info['cpu']}; one thread; input {a.mb:g} MB of float32 Gaussian rows of 4096")
    have = {r["type"]: r for r in recs if r["impl"] == "libggml"}
    print(f"{'type':6s} {'qkit MB/s':>10s} {'libggml MB/s':>13s} {'ratio':>6s}")
    for r in (r for r in recs if r["impl"] == "qkit"):
        g = have.get(r["type"])
        print(f"{r['type']:6s} {r['mb_per_s']:10.1f} " + (f"{g['mb_per_s']:13.1f} {r['mb_per_s'] / g['mb_per_s']:6.2f}"
                                                            if g else f"{'(not installed)':>13s}"))
    if a.json:
        with atomic_write(a.json, "w") as f:
            json.dump([{**r, "machine": info} for r in recs], f, indent=1)
    return recs


if __name__ == "__main__":
    main()
