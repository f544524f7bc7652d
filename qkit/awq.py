"""AWQ (Lin et al. 2023, "Activation-aware Weight Quantization"): protect salient input channels by scaling.

A weight column that multiplies a large activation matters more. Scaling input
channel j of a linear by s_j and its input by 1/s_j leaves the float output
unchanged, while the column's quantization error relative to its value shrinks
(paper section 3.2, eq. 4-5). The scales are

    s = mean|x|^alpha / sqrt(max(s') * min(s'))        (s' = mean|x|^alpha, clamped >= 1e-4)

with mean|x| the per-channel mean absolute activation over calibration tokens,
and alpha chosen from the grid 0, 1/n_grid, ..., (n_grid - 1)/n_grid (n_grid = 20)
to minimise the mean squared error of the output of the *block* the linears feed
(eq. 5: L(s) = ||f(W diag(s) Q-ed, diag(s)^-1 X) - f(W, X)||): the attention for
q/k/v, the MLP for gate/up, the linear itself for o and down (qkit.model.arch).
alpha = 0 is s = 1, round-to-nearest, so the search never does worse than RTN on
its tokens. The division by sqrt(max * min) is the reference implementation's
(llm-awq ``auto_scale.py``, AutoAWQ ``_search_best_scale``); it centres s
around 1 and does not change which alpha wins on a scale-invariant grid.

Every group's scales are searched on the float layer, then all are folded
(1/s into the preceding norm or linear, s into the linears' columns: the float
model is unchanged), then the optional clip search (llm-awq ``auto_clip.py``)
shrinks each (row, group)'s range [-m, m], m = max|w| (1 - k/20) for k < 10,
to minimise that group's share of the linear's output error on the (scaled)
calibration inputs; q and k are not clipped. The linears are then quantized by
the grid (round-to-nearest on the affine grid by default; any calibration-free
chooser with ``quantize(name, W) -> QuantResult`` will do).

AWQ then GPTQ (``gptq=GPTQConfig(...)``, CLI ``--round gptq``): the paper notes
AWQ is orthogonal to GPTQ (section 5, "compatible with GPTQ"). The scales are
searched as above (against round-to-nearest), folded, and the scaled weights
W diag(s) are then rounded by GPTQ, whose Hessian must be that of the scaled
inputs x / s: H_s = diag(1/s) H diag(1/s), computed from the H accumulated on
the float inputs. The clip search is off by default here: a clipped W would be
what GPTQ reproduces, and GPTQ's own grid choice (optionally its MSE clip, CLI --clip-search)
already trades range for resolution.

CPU cost: each alpha runs the block once. On all 128 x 512 calibration tokens
that is 20 forward passes of the attention and of the MLP per layer; qkit runs
the search and clip losses on `search_samples` calibration sequences (default 4,
evenly spaced over the set: 2,048 tokens at seqlen 512) and takes mean|x| over
every token. The clip loss is exact on those tokens through per-group Gram
matrices: sum_t (x_g . dw_g)^2 = dw_g G_g dw_g^T with G_g = X_g^T X_g.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qkit import affine
from qkit.errors import InputError, UsageError
from qkit.model import arch as archs
from qkit.chooser import ChooserBase, QuantResult
from qkit.rtn import RTN


@dataclass(frozen=True)
class AWQConfig:
    """AWQ's own options; grid: the affine grid the scaled weights are rounded onto (fp16 scales, as AWQ
    checkpoints store them)."""

    grid: affine.AffineConfig = affine.AffineConfig(scale_dtype="float16")
    n_grid: int = 20  # alpha in {0, 1/n_grid, ..., (n_grid - 1)/n_grid}
    clip: bool = True  # the clip search (llm-awq auto_clip)
    clip_grid: int = 20
    max_shrink: float = 0.5  # ranges shrunk by at most this fraction
    search_samples: int = 4  # calibration sequences the search and clip losses run on


# ------------------------------------------------------------------ the paper's formulas
def awq_scales(x_mean, alpha: float):
    """s = mean|x|^alpha (clamped >= 1e-4), divided by sqrt(max(s) * min(s)) (torch, float64)."""
    s = x_mean.double().pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def subset_indices(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n) (all of them when k >= n)."""
    if k >= n:
        return list(range(n))
    return sorted({int(round(v)) for v in np.linspace(0, n - 1, k)})


def clip_ranges(W, grams, group_size: int | None, fake, n_grid: int = 20, max_shrink: float = 0.5):
    """llm-awq's clip search: per (row, group), the m = max|w| (1 - k/n_grid), k < max_shrink n_grid, whose clamped
    and quantized group best reproduces the group's share of the output on the calibration inputs.

    W (out, in) torch; grams[j] = X_j^T X_j for group j's input columns; fake(W) -> grid-quantized W (any grid).
    The error of group j in row o is dw_oj G_j dw_oj^T with dw = fake(clamp(W)) - W.
    Returns m (out, n_groups).
    """
    import torch

    out, inp = W.shape
    g = group_size or inp
    starts = list(range(0, inp, g))
    amax = torch.stack([W[:, a:a + g].abs().amax(dim=1) for a in starts], dim=1)
    best_err = torch.full_like(amax, float("inf"), dtype=torch.float64)
    best = amax.clone()
    for k in range(int(max_shrink * n_grid)):
        m = amax * (1 - k / n_grid)
        mm = torch.repeat_interleave(m, torch.tensor([min(g, inp - a) for a in starts]), dim=1)
        dW = (fake(torch.clamp(W, -mm, mm)) - W).float()
        err = torch.stack([((dW[:, a:a + g] @ G) * dW[:, a:a + g]).sum(1)
                           for a, G in zip(starts, grams)], dim=1).double()
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, m, best)
    return best


def apply_clip(W, m, group_size: int | None):
    import torch

    inp = W.shape[1]
    g = group_size or inp
    counts = torch.tensor([min(g, inp - a) for a in range(0, inp, g)])
    mm = torch.repeat_interleave(m, counts, dim=1)
    return torch.clamp(W, -mm, mm)


def group_grams(X, group_size: int | None):
    """X_j^T X_j (float32) for each group j of input columns of X (tokens, in)."""
    X = X.reshape(-1, X.shape[-1]).float()
    g = group_size or X.shape[1]
    return [X[:, a:a + g].T @ X[:, a:a + g] for a in range(0, X.shape[1], g)]


# ------------------------------------------------------------------ the chooser
class AWQ(ChooserBase):
    """AWQ for the sequential pipeline: mean|x| from add_batch, a layer-level step, then the grid per linear."""

    name = "awq"
    needs_calibration = True
    # the next layer calibrates on the float layer's outputs (llm-awq's run_awq and AutoAWQ compute the next
    # inputs before scaling and quantizing): one forward per layer less than GPTQ's scheme
    propagate_float = True

    def __init__(self, cfg: AWQConfig, rounding=None, gptq=None):
        if cfg.n_grid < 1 or cfg.search_samples < 1 or cfg.clip_grid < 1 or not 0 <= cfg.max_shrink < 1:
            raise UsageError("AWQ needs n_grid >= 1, search_samples >= 1, clip_grid >= 1 and 0 <= max_shrink < 1")
        self.cfg = cfg
        # the chooser that rounds the scaled weights: RTN on cfg.grid unless given (qkit.gptq_ggml: GGML blocks)
        self.rounding = rounding or RTN(cfg.grid)
        if self.rounding.needs_calibration:
            raise UsageError("AWQ quantizes its scaled weights with a calibration-free chooser (rtn), "
                             f"not {self.rounding.name}")
        self.gptq = None
        if gptq is not None:   # AWQ's scales, then GPTQ's rounding of the scaled weights
            from qkit.gptq import GPTQ

            self.gptq = GPTQ(gptq)
        self.input_scale: dict = {}  # full linear name -> s folded into its columns (GPTQ's Hessian needs it)
        self.arch = None
        self.abs_sum: dict = {}
        self.count: dict = {}
        self.alphas: dict = {}  # name of the group's first linear -> chosen alpha (for the record)
        self._last = None  # (input tensor, name): q/k/v (and gate/up) see the same tensor; count it once

    def prepare(self, config) -> None:
        self.arch = archs.arch_for(config, "AWQ")

    def add_batch(self, name: str, X) -> None:
        import torch

        if self.gptq is not None:
            self.gptq.add_batch(name, X)
        last, self._last = self._last, (X, name)
        if last is not None and X is last[0]:   # the same tensor as the previous linear's: share its sums
            s = self._batch_sum
        else:
            X2 = X.reshape(-1, X.shape[-1])
            # float32 per batch, float64 across batches; a NaN or Inf anywhere makes its column's sum non-finite
            s = X2.abs().sum(0).double()
            if not torch.isfinite(s).all():
                raise InputError(f"{name}: the calibration activations hold NaN or Inf")
            self._batch_sum = s
        self.abs_sum[name] = s if name not in self.abs_sum else self.abs_sum[name] + s
        self.count[name] = self.count.get(name, 0) + X.reshape(-1, X.shape[-1]).shape[0]

    def x_mean(self, name: str):
        if name not in self.abs_sum:
            raise UsageError(f"AWQ got no calibration inputs for {name}")
        return self.abs_sum[name] / self.count[name]

    def fake(self, name: str, W):
        """W (torch) through the grid and back: what the linear holds once quantized."""
        import torch

        res = self.rounding.quantize(name, np.ascontiguousarray(W.detach().numpy(), dtype=np.float32))
        return torch.from_numpy(res.weight).to(W.dtype)

    def transform_layer(self, layer, inputs, prefix: str) -> None:
        """Search scales for every group of the architecture table, fold them, clip, in float.

        On one torch thread: the search runs many small blocks (2,048 tokens), for which a second OpenMP
        thread costs more in synchronisation than it gains, badly so when the machine is busy."""
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            self._transform(layer, inputs, prefix)
        finally:
            torch.set_num_threads(threads)
        self._last = None

    def _transform(self, layer, inputs, prefix: str) -> None:
        if self.arch is None:
            raise UsageError("AWQ.prepare(config) was not called: the architecture is unknown")
        groups = [g for g in self.arch.groups if self._applies(layer, g)]
        idx = subset_indices(inputs.states.shape[0], self.cfg.search_samples)
        X = self._capture(layer, inputs, inputs.states[idx], [g.linears[0] for g in groups])
        scales = [self.search_scale(layer, inputs, g, X[g.linears[0]], prefix) for g in groups]
        input_scale = {}
        for g, s in zip(groups, scales):
            archs.fold_into_prev(archs.submodule(layer, g.prev), s, is_norm=g.prev_is_norm,
                                 norm_offset=self.arch.norm_offset)
            for lin in g.linears:
                archs.scale_inputs(archs.submodule(layer, lin), s)
                input_scale[lin] = s
                self.input_scale[prefix + lin] = s
        if self.cfg.clip:
            for g in groups:
                Xs = X[g.linears[0]] / input_scale[g.linears[0]].float()
                grams = group_grams(Xs, self.cfg.grid.group_size)
                for lin in g.linears:
                    if lin in self.arch.no_clip:
                        continue
                    mod = archs.submodule(layer, lin)
                    W = mod.weight.data
                    m = clip_ranges(W, grams, self.cfg.grid.group_size, lambda w, n=prefix + lin: self.fake(n, w),
                                    self.cfg.clip_grid, self.cfg.max_shrink)
                    mod.weight.data = apply_clip(W, m, self.cfg.grid.group_size).to(W.dtype)
        for g in groups:
            for lin in g.linears:
                self.abs_sum.pop(prefix + lin, None)
                self.count.pop(prefix + lin, None)

    def _applies(self, layer, g) -> bool:
        if not g.same_shape_only:
            return True
        return archs.submodule(layer, g.prev).weight.shape == archs.submodule(layer, g.linears[0]).weight.shape

    @staticmethod
    def _capture(layer, inputs, states, names):
        """The inputs of the named linears when the float layer runs on `states`."""
        import torch

        got = {n: [] for n in names}
        hooks = [archs.submodule(layer, n).register_forward_hook(
            lambda m, inp, out, n=n: got[n].append(inp[0].detach().clone())) for n in names]
        try:
            inputs.run(layer, states, layer_kwargs=True)
        finally:
            for h in hooks:
                h.remove()
        return {n: torch.cat(v) for n, v in got.items()}

    def search_scale(self, layer, inputs, g, X, prefix: str):
        """The alpha grid search of one group (weights restored afterwards); returns s (float64, per channel)."""
        import torch

        block = archs.submodule(layer, g.block)
        mods = [archs.submodule(layer, n) for n in g.linears]
        orig = [m.weight.data.clone() for m in mods]
        x_mean = self.x_mean(prefix + g.linears[0])
        ref = inputs.run(block, X, layer_kwargs=g.block_takes_layer_kwargs)
        best, best_s, best_alpha = float("inf"), None, None
        try:
            for i in range(self.cfg.n_grid):
                alpha = i / self.cfg.n_grid
                s = awq_scales(x_mean, alpha)
                s32 = s.to(orig[0].dtype)
                for m, W, n in zip(mods, orig, g.linears):
                    # Q(W diag(s)) diag(s)^-1: the scaled weight on the grid, seen by the unscaled input
                    m.weight.data = self.fake(prefix + n, W * s32) / s32
                out = inputs.run(block, X, layer_kwargs=g.block_takes_layer_kwargs)
                loss = float((ref - out).pow(2).mean(dtype=torch.float64))
                if loss < best:
                    best, best_s, best_alpha = loss, s, alpha
        finally:
            for m, W in zip(mods, orig):
                m.weight.data = W
        if best_s is None:
            raise InputError(f"{prefix}{g.block}: the block output error is NaN for every alpha")
        self.alphas[prefix + g.linears[0]] = best_alpha
        return best_s

    @property
    def affine_grid(self):
        """The grid the rounding chooser puts the scaled weights on (None for llama.cpp's GGML blocks)."""
        return (self.gptq if self.gptq is not None else self.rounding).affine_grid

    def export_spec(self, fmt: str, act_bits: int | None = None):
        """The rounding's spec (GPTQ's act-order, groups and damping with --round gptq), recorded as AWQ."""
        from dataclasses import replace

        inner = self.gptq if self.gptq is not None else self.rounding
        return replace(inner.export_spec(fmt, act_bits), method=self.name)

    def quantize(self, name: str, W: np.ndarray) -> QuantResult:
        s = self.input_scale.pop(name, None)
        if self.gptq is None:
            return self.rounding.quantize(name, W)
        H = self.gptq.H.get(name)
        if H is not None and s is not None:
            # the linear now sees x / s: H_s = diag(1/s) H diag(1/s) (a new tensor: q/k/v share one H)
            inv = (1.0 / s).to(H.dtype)
            self.gptq.H[name] = H * inv[:, None] * inv[None, :]
        return self.gptq.quantize(name, W)
