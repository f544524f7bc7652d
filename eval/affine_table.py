"""Affine-grid error table: bits x granularity x how scale/zero are chosen.

    qkit bench affine [--rows 576] [--cols 1536] [--json PATH]

Quantizes synthetic weight matrices shaped like the default model's MLP
(576 x 1536) with round-to-nearest on the affine grid and reports the relative
RMS error ||W_hat - W|| / ||W||, the SQNR in dB and the storage cost in bits
per weight (codes + an fp16 scale per block + a `bits`-bit zero per block when
asymmetric). Three weight distributions: Gaussian, Student-t with 4 degrees of
freedom (heavy tails) and Gaussian with 1% outlier input columns scaled x20
(the channel outliers that motivate AWQ and SmoothQuant).
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from qkit import affine
from qkit.fileio import atomic_write

GRANULARITIES = {"tensor": None, "channel": -1, "g128": 128, "g32": 32}
CHOICES = {"asym-minmax": (False, "minmax"), "sym-minmax": (True, "minmax"), "asym-mse": (False, "mse")}


def weights(kind: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "gaussian":
        return rng.standard_normal((rows, cols)).astype(np.float32) * 0.02
    if kind == "student-t4":
        return rng.standard_t(4, (rows, cols)).astype(np.float32) * 0.02
    if kind == "outlier-cols":
        w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.02
        cols_out = rng.choice(cols, max(1, cols // 100), replace=False)
        w[:, cols_out] *= 20
        return w
    raise ValueError(kind)


def block_size(gran: str, shape) -> tuple[int, int]:
    g = GRANULARITIES[gran]
    return tuple(shape) if g is None else (1, g)


def bits_per_weight(bits: int, shape, bs, symmetric: bool) -> float:
    nb = np.prod(affine.n_blocks(shape, affine.normalize_block_size(shape, bs)))
    side = nb * (16 + (0 if symmetric else bits))
    return bits + side / np.prod(shape)


def run(rows: int, cols: int, bits_list, seed: int = 0, kinds=("gaussian", "student-t4", "outlier-cols")) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for kind in kinds:
        W = weights(kind, rows, cols, rng)
        for bits in bits_list:
            for gran in GRANULARITIES:
                bs = block_size(gran, W.shape)
                for choice, (sym, method) in CHOICES.items():
                    q = affine.quantize_affine(W, bits, bs, symmetric=sym, method=method)
                    err = q.dequantize() - W
                    rel = float(np.linalg.norm(err) / np.linalg.norm(W))
                    out.append({"weights": kind, "bits": bits, "granularity": gran, "choice": choice,
                                "rel_rmse": rel, "sqnr_db": float(-20 * np.log10(rel)),
                                "bits_per_weight": float(bits_per_weight(bits, W.shape, bs, sym))})
    return out


def print_table(records: list[dict]) -> None:
    choices = list(CHOICES)
    for kind in dict.fromkeys(r["weights"] for r in records):
        print(f"\nweights: {kind}  (SQNR dB; higher is better; bpw = bits per weight with scales/zeros)")
        head = f"{'bits':>4s} {'granularity':>11s} {'bpw':>6s} " + " ".join(f"{c:>12s}" for c in choices)
        print(head)
        print("-" * len(head))
        rows = [r for r in records if r["weights"] == kind]
        for bits in dict.fromkeys(r["bits"] for r in rows):
            for gran in GRANULARITIES:
                cell = {r["choice"]: r for r in rows if r["bits"] == bits and r["granularity"] == gran}
                bpw = cell["asym-minmax"]["bits_per_weight"]
                print(f"{bits:4d} {gran:>11s} {bpw:6.2f} " + " ".join(f"{cell[c]['sqnr_db']:12.2f}" for c in choices))


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="qkit bench affine", description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=576)
    ap.add_argument("--cols", type=int, default=1536)
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    ap.add_argument("--json", metavar="PATH")
    a = ap.parse_args(argv)
    records = run(a.rows, a.cols, a.bits)
    print_table(records)
    if a.json:
        with atomic_write(a.json, "w") as f:
            json.dump(records, f, indent=1)
    return records


if __name__ == "__main__":
    main()
