"""GPTQ as the paper states it, in plain numpy and float64: the independent reference for qkit.gptq.

Frantar et al. 2022, section 3 (eq. 2-3) without any of section 4's speed-ups:
an explicit H^-1, each quantized column eliminated from it by Gaussian
elimination (eq. 3, right), its error pushed at once to every column not yet
quantized (no lazy batches, no Cholesky rows). Group parameters are qkit's
affine min-max grid (0 inside the range, integer zero), taken from the
weights as they stand when the group's first column is reached, in processing
order; with static groups, from the original weights at fixed column groups.
Slow (O(in^3) per layer) and obviously correct: tests and the diagnosis in
eval/gptq_diag.py hold qkit.gptq.gptq_quantize to it on real activations.
"""
from __future__ import annotations

import numpy as np


def minmax_params(Wg: np.ndarray, bits: int, sym: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per-row scale and integer zero of a group of columns Wg (rows, k), zero inside the range."""
    maxq = 2**bits - 1
    lo = np.minimum(Wg.min(axis=1), 0)
    hi = np.maximum(Wg.max(axis=1), 0)
    scale = 2 * np.maximum(-lo, hi) / maxq if sym else (hi - lo) / maxq
    scale = np.where(scale > 0, scale, 1.0)
    zero = np.full_like(scale, (maxq + 1) // 2) if sym else np.clip(np.round(-lo / scale), 0, maxq)
    return scale, zero


def reference_gptq(W, H, bits: int, group_size: int | None, sym: bool = False, act_order: bool = False,
                   damp: float = 0.01, static_groups: bool = False,
                   group_aware: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(Q, codes) for W (out, in) and the Hessian H = 2 X^T X / n (in, in), both float64.

    group_aware (with act_order): the groups stay at columns [k g, (k + 1) g); they are visited in decreasing
    order of their largest diag(H), each group's columns in decreasing diag(H), and a group's parameters are
    taken from its current weights when its first column is reached.
    """
    W = np.array(W, dtype=np.float64)
    H = np.array(H, dtype=np.float64)
    cols = W.shape[1]
    g = group_size or cols
    maxq = 2**bits - 1
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    d = np.diag(H).copy()
    order = np.argsort(-d, kind="stable") if act_order else np.arange(cols)
    aware = act_order and group_aware and not static_groups
    if aware:
        starts = np.arange(0, cols, g)
        by_top = np.argsort([-d[s:s + g].max() for s in starts], kind="stable")
        order = np.concatenate([starts[k] + np.argsort(-d[starts[k]:starts[k] + g], kind="stable") for k in by_top])
    H = H + damp * np.mean(np.diag(H)) * np.eye(cols)
    Hinv = np.linalg.inv(H)
    static = [minmax_params(W[:, s:s + g], bits, sym) for s in range(0, cols, g)] if static_groups else None
    Q = np.zeros_like(W)
    codes = np.zeros_like(W)
    done = np.zeros(cols, dtype=bool)
    for pos, j in enumerate(order):
        if static is not None:
            scale, zero = static[j // g]
        elif aware:
            if pos == 0 or order[pos - 1] // g != j // g:
                s0 = j // g * g
                scale, zero = minmax_params(W[:, s0:s0 + g], bits, sym)
        elif pos % g == 0:
            scale, zero = minmax_params(W[:, order[pos:pos + g]], bits, sym)
        c = np.clip(np.round(W[:, j] / scale + zero), 0, maxq)
        q = scale * (c - zero)
        Q[:, j], codes[:, j] = q, c
        done[j] = True
        rest = ~done
        err = (W[:, j] - q) / Hinv[j, j]
        W[:, rest] -= np.outer(err, Hinv[j, rest])  # eq. 3, left: the optimal update of the rest
        Hinv = Hinv - np.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]  # eq. 3, right: eliminate column j
    return Q, codes
