"""The decode GEMV: W4 g128 weights as GPTQ packs them against one token, qkit's W4A8 kernel vs torch fp32, one thread.

    qkit bench gemv [--repeat 20] [--json PATH] [--plot PATH]

One thread everywhere, except one row of qkit's native kernel with two explicit threads (outputs split).
Shapes: the default model's linears (SmolLM2-135M: hidden 576, MLP 1536, 3 KV heads of 64) and two
larger ones (2048 x 8192, 4096 x 4096: weights past the caches, the memory-bound regime decode lives in). For
each: torch float32 ``mv`` on the dense weight (what `qkit eval ppl` runs today), and qkit's W4A8 GEMV on
every backend and path (AVX-512 VNNI where the CPU has it, AVX2, scalar C, Numba; the activation quantized to
q8 blocks inside the timed call). GB/s counts the bytes each method
reads (fp32 weight; packed qweight + fp16-sized scales + zeros); `x fp32` is torch's time / this time; the
single-core read bandwidth (qkit.eval.bandwidth) is measured in the same run as the ceiling. Times are the best
of `repeat` runs.
"""
from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one thread, all methods
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402

from qkit import ext  # noqa: E402
from qkit.eval import machine  # noqa: E402
from qkit.eval.bench_kernels import best_ms, qkit_backends  # noqa: E402
from qkit.fileio import atomic_write  # noqa: E402

# (name, in, out): the default model's decode linears, then two past the caches
SHAPES = [("q/o 576x576", 576, 576), ("k/v 576x192", 576, 192), ("gate/up 576x1536", 576, 1536),
          ("down 1536x576", 1536, 576), ("2048x8192", 2048, 8192), ("4096x4096", 4096, 4096)]
GROUP = 128


def _case(rng, n_in, n_out):
    from qkit import packing

    codes = rng.integers(0, 16, (n_in, n_out)).astype(np.uint8)
    ng = -(-n_in // GROUP)
    zeros = rng.integers(0, 16, (ng, n_out)).astype(np.uint8)
    scales = (rng.random((ng, n_out)) * 0.02 + 1e-3).astype(np.float16).astype(np.float32)
    qweight = np.ascontiguousarray(packing.pack_gptq_qweight(codes, bits=4))
    gi = np.arange(n_in) // GROUP
    W = (scales[gi] * (codes.astype(np.float32) - zeros[gi])).T.copy()  # (out, in) float32, as torch holds it
    return qweight, zeros, scales, W


def run(repeat: int = 20) -> tuple[list[dict], dict]:
    import torch

    torch.set_num_threads(1)
    from qkit.eval import bandwidth

    rng = np.random.default_rng(0)
    recs = []
    for name, n_in, n_out in SHAPES:
        qweight, zeros, scales, W = _case(rng, n_in, n_out)
        x = rng.standard_normal(n_in).astype(np.float32)
        Wt, xt = torch.from_numpy(W), torch.from_numpy(x)
        t_fp32 = best_ms(lambda: torch.mv(Wt, xt), repeat)
        y_ref = (W.astype(np.float64) @ x.astype(np.float64))
        packed = qweight.nbytes + zeros.nbytes + scales.size * 2  # scales as fp16 on disk
        recs.append({"shape": name, "in": n_in, "out": n_out, "method": "torch fp32 mv", "ms": t_fp32,
                     "bytes": W.nbytes, "gbps": W.nbytes / t_fp32 / 1e6, "x_fp32": 1.0, "rel_err": 0.0})
        runs = [(b, i, 1) for b, i in qkit_backends()]
        if ext.native_available():
            if ext.best_isa_w4a8() == "avx512vnni":  # the AVX-512 VNNI path, where the CPU has it
                runs.insert(0, ("native", "avx512vnni", 1))
            runs.insert(1, ("native", ext.best_isa_w4a8(), 2))  # two explicit threads (torch stays at one)
        for backend, isa, threads in runs:
            def call(backend=backend, isa=isa, threads=threads):
                xq, xs = ext.quantize_q8(x)
                return ext.gemv_w4a8(xq, xs, qweight, zeros, scales, GROUP, threads=threads, backend=backend,
                                     isa=isa)

            t = best_ms(call, repeat if backend == "native" else max(2, repeat // 5))
            y = call()
            err = float(np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref))  # the q8 activation's rounding
            recs.append({"shape": name, "in": n_in, "out": n_out, "method": f"qkit W4A8 {backend}"
                         + (f"-{isa}" if isa else "") + (f" x{threads}" if threads > 1 else ""), "ms": t,
                         "threads": threads, "bytes": packed, "gbps": packed / t / 1e6,
                         "x_fp32": t_fp32 / t, "rel_err": err})
    info = {**machine.describe(), "torch": torch.__version__, "threads": 1, "group_size": GROUP,
            "read_gbps_1core": bandwidth.measure(mb=256, repeat=3)["read_gbps"]}
    return recs, info


def print_table(recs: list[dict], info: dict) -> None:
    print(f"machine: {info['cpu']}, 1 thread; torch {info['torch']}; "
          f"single-core read {info['read_gbps_1core']:.1f} GB/s")
    head = f"{'shape':18s} {'method':24s} {'ms':>8s} {'MB read':>8s} {'GB/s':>6s} {'x fp32':>7s} {'rel err':>8s}"
    print(head)
    print("-" * len(head))
    for r in recs:
        print(f"{r['shape']:18s} {r['method']:24s} {r['ms']:8.4f} {r['bytes'] / 1e6:8.2f} {r['gbps']:6.1f} "
              f"{r['x_fp32']:7.2f} {r['rel_err']:8.1e}")


def plot(recs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in recs))
    methods = list(dict.fromkeys(r["method"] for r in recs))
    fig, ax = plt.subplots(figsize=(9, 4))
    w = 0.8 / len(methods)
    for j, m in enumerate(methods):
        ys = [next((r["x_fp32"] for r in recs if r["shape"] == s and r["method"] == m), 0) for s in shapes]
        ax.bar(np.arange(len(shapes)) + j * w, ys, w, label=m)
    ax.set_xticks(np.arange(len(shapes)) + 0.4 - w / 2, shapes, rotation=20, fontsize=8)
    ax.set_ylabel("speed vs torch fp32 mv (x)")
    ax.axhline(1, color="k", lw=0.5)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="qkit bench gemv", description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--json", default=None, help="Write records and machine info as JSON.")
    ap.add_argument("--plot", default=None, help="Write a PNG of the speed-ups.")
    a = ap.parse_args(argv)
    recs, info = run(a.repeat)
    print_table(recs, info)
    if a.json:
        with atomic_write(a.json, "w") as f:
            json.dump({"machine": info, "records": recs}, f, indent=1)
    if a.plot:
        plot(recs, a.plot)
    return recs


if __name__ == "__main__":
    main()
