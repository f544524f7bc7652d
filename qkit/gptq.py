"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh 2022): quantization with second-order error feedback.

For a linear layer with weight W (out x in) and calibration inputs X (tokens x in),
GPTQ minimises ||W X^T - Q X^T||^2 one input column at a time. With the
Hessian of that objective, H = 2 X^T X (paper eq. 1-2), quantizing column j
to q_j and spreading its error over the columns not yet quantized,

    err = (w_j - q_j) / [H^-1]_jj,    W[:, j+1:] -= err * [H^-1]_{j, j+1:}

is the optimal-brain-surgeon update (paper section 3, eq. 3). The paper's
three tricks, all here:
  * arbitrary order: columns in order (or by decreasing diag(H), "act-order");
  * lazy batch updates: errors of a block of 128 columns are applied to the
    rest of the matrix at once (section 4, step 2);
  * Cholesky reformulation: the rows of H^-1 needed are those of the upper
    Cholesky factor of H^-1 (section 4, step 3), after dampening H by
    `damp` x mean(diag H) for numerical stability.
Dead inputs (H_jj = 0, a column never activated) get H_jj = 1 and a zero
weight column, as in the reference implementation.

Groups: with group_size g, a group's scale and zero are chosen when its first
column is reached, from the weights as they stand then (errors of the
earlier columns already folded in). With act-order, groups follow the
permuted order and g_idx[j] records each original column's group; with
static groups, all groups' parameters are fixed up front from the original
weights and act-order only changes the processing order. Group-aware
act-order (GPTQModel's reordering) keeps the groups at contiguous original
columns, as static groups do, but chooses each group's parameters when it is
reached: groups go in decreasing order of their most important column's
diag(H), and the columns of a group in decreasing diag(H); so g_idx = i // g.

The grid is a parameter: anything with `params(W_group) -> p` and
`quantize(w, p) -> (w_hat, codes)`; qkit's affine grid is the default. A grid
whose groups sit at fixed columns and whose levels vary inside a group (a GGML
block with its sub-block scales, qkit.ggml.grid) sets `positional = True` and
gets `params(W_group, first_column)` and `quantize(w, p, column_in_group)`;
with act-order such a grid needs static groups (a group is then still a run
of consecutive original columns).

Asymmetric calibration (GPTAQ, Li et al. 2025, "GPTAQ: Efficient Finetuning-Free
Quantization for Asymmetric Calibration", GPTQModel's v2): in the sequential
pipeline a layer's inputs X~ come from the already-quantized layers, and plain
GPTQ matches W X~ (the float weights on those inputs), so it never undoes what the
earlier layers got wrong. GPTAQ's target is the float model's output W X instead,
with X the float model's inputs of the same linear:

    min_Q ||W X - Q X~||^2 (+ damp ||W - Q||^2, the dampening as a ridge term)

With H = X~ X~^T + damp I (H of this module) and dXX = (X - X~) X~^T, expanding the
square gives ||W X - Q X~||^2 = const + tr((W* - Q) H (W* - Q)^T), where

    W* = W + W dXX H^-1

is the unconstrained optimum (the normal equations Q H = W X X~^T + damp W). So
GPTAQ is GPTQ's column loop run on W* with the same H: every step's error feedback
(the optimal remaining columns given the quantized ones) is the same for both
objectives, as they differ by a constant. The paper derives an equivalent
column-wise update; here the asymmetric term is folded into the target once.
The authors' implementation scales the asymmetric term by alpha = 0.25
(fake_quant/gptaq_utils.py, `fasterquant(alpha=0.25)`); so does qkit,
W* = W + alpha W dXX H^-1: the full correction (alpha = 1) fits the calibration
text's upstream errors exactly and, measured on the default model, wrecks held-out
perplexity (W4 g128: 34.45 RTN -> 140.5 on the Britannica text).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qkit import affine
from qkit.errors import InputError, UsageError
from qkit.chooser import ChooserBase, QuantResult


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ's own options; the grid it rounds onto is a field of its own (grid.method "mse": each group's range
    searched, GPTQ's --clip-search)."""

    grid: affine.AffineConfig = affine.AffineConfig()
    act_order: bool = False
    static_groups: bool = False
    group_aware: bool = False  # with act_order: importance order between and within contiguous groups
    damp: float = 0.01
    block_size: int = 128
    gptaq: bool = False  # asymmetric calibration: the float model's outputs as the target (GPTAQ)
    gptaq_alpha: float = 0.25  # share of the asymmetric correction applied (the GPTAQ authors' default)
    true_sequential: bool = False  # inside a layer, each linear group calibrated on the quantized groups before it


# What `qkit quantize --method gptq` runs unless told otherwise (GPTQConfig itself is the plain algorithm):
# chosen by the share of RTN's gap closed on each of three held-out texts (qkit bench heldout; records in
# eval/records/heldout.json). W4 g128 on the default model: act-order alone 23/40/18%; with GPTAQ (alpha 0.25)
# and true-sequential 56/69/55% on 128 x 512 calibration tokens (2.1x act-order's time) and 50/64/54% on 64 x 512
# (1.2x): 64 sequences keep the calibration within 1.5x of plain GPTQ's time.
CLI_DEFAULTS = {"act_order": True, "true_sequential": True, "gptaq": True, "gptaq_alpha": 0.25, "nsamples": 64}


class AffineGrid:
    """The affine grid, one group's parameters at a time (the same formulas as qkit.affine)."""

    def __init__(self, cfg: affine.AffineConfig):
        self.cfg = cfg
        self.maxq = 2**cfg.bits - 1

    def params(self, Wg):
        """scale, zero (torch, shape (out, 1)) for a group of columns Wg (out, k)."""
        import torch

        x = Wg.detach().cpu().numpy()
        c = self.cfg
        scale, zero = affine.choose_qparams(x, c.bits, (1, x.shape[1]), symmetric=c.symmetric,
                                            zero_domain=c.zero_domain, method=c.method, scale_dtype=c.scale_dtype,
                                            min_zero=c.min_zero)
        return (torch.from_numpy(np.asarray(scale)).to(Wg.dtype), torch.from_numpy(np.asarray(zero)).to(Wg.dtype))

    def quantize(self, w, p):
        """One column w (out,) -> (dequantized values, integer codes)."""
        import torch

        scale, zero = p[0][:, 0], p[1][:, 0]
        q = torch.clamp(torch.round(w / scale + zero), 0, self.maxq)
        return scale * (q - zero), q


def merge_hessians(parts):
    """[(H, n), ...] running Hessians of disjoint slices of the calibration tokens (several workers) -> (H, n) of
    all of them: H = (2 / n) sum x x^T is a mean, so the merge is the token-weighted mean (hessian_update's H on
    the concatenated tokens, to float summation order)."""
    parts = [(H, n) for H, n in parts if n]
    if not parts:
        return None, 0
    n = sum(k for _, k in parts)
    H = sum(P.double() * (k / n) for P, k in parts)
    return H.to(parts[0][0].dtype), n


def hessian_update(H, n: int, X, blocks: int = 4):
    """Running H = (2 / n) sum x x^T over n tokens (the reference's add_batch); returns (H, n).

    H is symmetric, so only its upper block triangle is multiplied out (`blocks` x `blocks`
    column blocks: (blocks + 1) / (2 blocks) of the flops, 5/8 for 4) and mirrored; on the
    default model this is a third of GPTQ's time, the rest being the two layer forwards.
    """
    import torch

    X = X.reshape(-1, X.shape[-1]).to(torch.float32)
    m, k = X.shape
    if H is None:
        H = torch.zeros(k, k, dtype=torch.float32)
    H.mul_(n / (n + m))
    n += m
    Xs = X * (2.0 / n) ** 0.5
    e = [k * i // blocks for i in range(blocks + 1)]
    for a in range(blocks):
        if e[a] < e[a + 1]:
            H[e[a]:e[a + 1], e[a]:].addmm_(Xs[:, e[a]:e[a + 1]].T, Xs[:, e[a]:])
    for a in range(1, blocks):
        H[e[a]:, e[a - 1]:e[a]] = H[e[a - 1]:e[a], e[a]:].T
    return H, n


def cross_update(D, n: int, dX, X):
    """Running dXX = (2 / n) sum dx x^T with hessian_update's scaling (call it first, with n before the update)."""
    import torch

    X = X.reshape(-1, X.shape[-1]).to(torch.float32)
    dX = dX.reshape(-1, dX.shape[-1]).to(torch.float32)
    m, k = X.shape
    if dX.shape != X.shape:
        raise InputError(f"float inputs of shape {tuple(dX.shape)} do not match the quantized inputs' {tuple(X.shape)}")
    if D is None:
        D = torch.zeros(k, k, dtype=torch.float32)
    D.mul_(n / (n + m))
    D.addmm_(dX.T, X, alpha=2.0 / (n + m))
    return D


def damped(H, damp: float):
    """H + damp mean(diag H) I, in place: GPTQ's dampening (section 4, step 3)."""
    import torch

    cols = H.shape[0]
    H[range(cols), range(cols)] += damp * torch.mean(torch.diag(H))
    return H


def asymmetric_target(W, H, dXX, damp: float, alpha: float = 1.0):
    """GPTAQ's W* = W + alpha W dXX (H + damp mean(diag H) I)^-1; alpha = 1: the optimum of
    ||W X - Q X~||^2 + damp ||W - Q||^2."""
    import torch

    try:
        L = torch.linalg.cholesky(damped(H.clone(), damp))
    except RuntimeError:
        raise InputError("the Hessian is not positive definite even after damping; raise --damp") from None
    return W + alpha * torch.cholesky_solve((W @ dXX).T.contiguous(), L).T


def _group_aware_order(d, g: int):
    """Columns grouped at i // g: groups by decreasing max diag(H), within a group by decreasing diag(H)."""
    import torch

    cols = d.numel()
    starts = list(range(0, cols, g))
    top = torch.stack([d[s:s + g].max() for s in starts])
    order = torch.argsort(top, descending=True, stable=True).tolist()
    return torch.cat([starts[k] + torch.argsort(d[starts[k]:starts[k] + g], descending=True, stable=True)
                      for k in order])


def gptq_quantize(W, H, cfg: GPTQConfig, grid=None, dXX=None):
    """Quantize W (out, in) given H (in, in). Returns (Q dequantized, codes, scales, zeros, g_idx) as torch.

    dXX (in, in): GPTAQ's cross term (X - X~) X~^T, scaled as H; the target is then the float model's output.
    scales/zeros are (out, n_groups) in group order; g_idx (in,) maps each original column to its group.
    Runs on one torch thread: the column loop is thousands of small operations, for which a
    second OpenMP thread only adds synchronisation (10x slower here when another process is busy).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _gptq(W, H, cfg, grid, dXX)
    finally:
        torch.set_num_threads(threads)


def _gptq(W, H, cfg: GPTQConfig, grid=None, dXX=None):
    import torch

    grid = grid or AffineGrid(cfg.grid)
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32  # float64 in, float64 throughout
    W = W.clone().to(dtype)
    H = H.clone().to(dtype)
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise InputError(f"Hessian of shape {tuple(H.shape)} does not match a weight with {cols} columns")
    g = cfg.grid.group_size or cols
    if g < 1:
        raise UsageError(f"group_size must be >= 1, got {g}")

    if not torch.isfinite(H).all():
        raise InputError("the Hessian holds NaN or Inf: the calibration activations are not finite")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if dXX is not None:  # GPTAQ: the float model's output as the target (module docstring)
        if dXX.shape != H.shape:
            raise InputError(f"cross term of shape {tuple(dXX.shape)} does not match the Hessian's {tuple(H.shape)}")
        W = asymmetric_target(W, H, dXX.to(dtype), cfg.damp, cfg.gptaq_alpha)

    positional = getattr(grid, "positional", False)
    if positional and cfg.act_order and not cfg.static_groups:
        raise UsageError(f"act-order with the {getattr(grid, 'name', 'positional')} grid needs static groups: "
                         "its blocks are runs of consecutive original columns")
    static = None
    if cfg.static_groups:  # fixed from the original weights, in original column order
        static = [grid.params(W[:, s:s + g], s) if positional else grid.params(W[:, s:s + g])
                  for s in range(0, cols, g)]

    perm = None
    if cfg.act_order:
        perm = (_group_aware_order(torch.diag(H), g) if cfg.group_aware and static is None
                else torch.argsort(torch.diag(H), descending=True, stable=True))
        W = W[:, perm]
        H = H[perm][:, perm]
    group_aware = perm is not None and cfg.group_aware and static is None

    damped(H, cfg.damp)
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except RuntimeError:
        raise InputError("the Hessian is not positive definite even after damping; raise --damp") from None

    Q = torch.zeros_like(W)
    codes = torch.zeros_like(W)
    by_group: dict = {}  # group id -> its (scale, zero), as chosen
    group_of_pos = torch.zeros(cols, dtype=torch.long)  # group of each processed position
    p = None
    for i1 in range(0, cols, cfg.block_size):
        i2 = min(i1 + cfg.block_size, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        C1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if static is not None:
                gi = int(perm[j]) // g if perm is not None else j // g
                p = static[gi]
                group_of_pos[j] = gi
            else:
                gi = int(perm[j]) // g if group_aware else j // g
                if j == 0 or gi != int(group_of_pos[j - 1]):
                    # the group's weights as they stand now: in-block columns from W1, later ones with the
                    # pending (lazy) corrections of this block's errors applied
                    n = min(g, cols - int(perm[j]) // g * g) if group_aware else g  # ragged last group
                    cur = W1[:, i:i + n]
                    if j + n > i2:
                        rest = W[:, i2:j + n] - Err1[:, :i] @ Hinv[i1:i1 + i, i2:j + n]
                        cur = torch.cat([cur, rest], dim=1)
                    p = grid.params(cur, j) if positional else grid.params(cur)
                    by_group[gi] = p
                group_of_pos[j] = gi
            w = W1[:, i]
            d = Hinv1[i, i]
            if positional:  # the column's place in its group: original order (static) or processing order
                q, c = grid.quantize(w, p, (int(perm[j]) if static is not None and perm is not None else j) % g)
            else:
                q, c = grid.quantize(w, p)
            Q1[:, i] = q
            C1[:, i] = c
            err = (w - q) / d
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        codes[:, i1:i2] = C1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    params = static if static is not None else [by_group[k] for k in sorted(by_group)]
    scales = [s for s, _ in params]
    zeros = [z for _, z in params]
    g_idx = group_of_pos
    if perm is not None:
        inv = torch.argsort(perm)
        Q, codes, g_idx = Q[:, inv], codes[:, inv], group_of_pos[inv]
    return Q, codes, torch.cat(scales, dim=1), torch.cat(zeros, dim=1), g_idx.to(torch.int32)


class GPTQ(ChooserBase):
    """The GPTQ chooser for the sequential pipeline: Hessians from calibration inputs, then gptq_quantize."""

    name = "gptq"
    needs_calibration = True

    def __init__(self, cfg: GPTQConfig, grid=None):
        self.cfg = cfg
        self.grid = grid  # a grid object other than cfg.grid's affine one (qkit.gptq_ggml's GGML blocks)
        self.H: dict = {}
        self.n: dict = {}
        self.D: dict = {}  # GPTAQ's cross terms
        self._last = None  # (input tensor, name): q/k/v (and gate/up) see the same input; share one H

    @property
    def needs_float_inputs(self) -> bool:
        """GPTAQ: the pipeline also runs the float model and hands add_batch each linear's float inputs."""
        return self.cfg.gptaq

    @property
    def true_sequential(self) -> bool:
        """The pipeline calibrates and quantizes each layer's linear groups in order (pipeline.calibrate_sequential)."""
        return self.cfg.true_sequential

    def add_batch(self, name: str, X, X_float=None) -> None:
        last = self._last
        if last is not None and X is last[0] and last[1] in self.H and self.H.get(name) is None:
            self.H[name] = self.H[last[1]]  # same inputs every batch: alias, accumulate once
            self.n[name] = None
            if last[1] in self.D:
                self.D[name] = self.D[last[1]]
        if self.n.get(name, 0) is None:  # an alias: its owner accumulates
            self._last = (X, name)
            return
        if self.cfg.gptaq:
            if X_float is None:
                raise UsageError(f"GPTAQ needs the float model's inputs of {name}")
            self.D[name] = cross_update(self.D.get(name), self.n.get(name, 0), X_float - X, X)
        self.H[name], self.n[name] = hessian_update(self.H.get(name), self.n.get(name, 0), X)
        self._last = (X, name)

    def export_spec(self, fmt: str, act_bits: int | None = None):
        """The affine grid plus how GPTQ ran: act-order, static groups, group-aware order, damping, order."""
        from dataclasses import replace

        c = self.cfg
        return replace(super().export_spec(fmt, act_bits), act_order=c.act_order, static_groups=c.static_groups,
                       damp=c.damp, group_aware=c.act_order and c.group_aware, true_sequential=c.true_sequential)

    def quantize(self, name: str, W: np.ndarray) -> QuantResult:
        import torch

        H = self.H.pop(name, None)
        D = self.D.pop(name, None)
        self.n.pop(name, None)
        self._last = None
        if H is None:
            raise UsageError(f"GPTQ got no calibration inputs for {name}")
        if self.cfg.gptaq and D is None:
            raise UsageError(f"GPTAQ got no float inputs for {name}")
        Q, codes, scales, zeros, g_idx = gptq_quantize(torch.from_numpy(W), H, self.cfg, self.grid, D)
        zero_np = zeros.numpy()
        return QuantResult(Q.numpy(), codes.numpy().astype(np.uint8), scales.numpy(),
                           zero_np.astype(np.int32) if self.cfg.grid.zero_domain == "int" else zero_np,
                           g_idx.numpy(), self.cfg.grid.bits, self.cfg.grid.symmetric)
