"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights, then W8A8.

Activations have a few channels with large magnitudes, which a per-token int8
grid rounds badly; weights are flat and easy. Per input channel j of the
linears that share one input (paper section 4, eq. 4):

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

max|X_j| over every calibration token, max|W_j| over the rows of all those
linears (the reference's ``smooth_ln_fcs``: both clamped >= 1e-5). X diag(s)^-1
is folded into the norm that produces X and diag(s) W^T into the linears, so
the float model is unchanged. alpha = 0.5 by default (the paper's choice for
most models). As the reference does for Llama, only norm-fed groups are smoothed
(q/k/v behind the attention's input norm, gate/up behind the MLP's), from the
architecture table (qkit.model.arch).

Weights then go to per-channel symmetric int8 (round to nearest); activations
are quantized per token, dynamically, to symmetric int8 at inference time
(qkit.actquant), which the compressed-tensors ``int-quantized`` export records.
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
class SmoothQuantConfig:
    """SmoothQuant's own options; grid: the weights' grid after smoothing (W8A8: per-channel symmetric int8)."""

    alpha: float = 0.5
    grid: affine.AffineConfig = affine.AffineConfig(bits=8, group_size=None, symmetric=True, scale_dtype="float16")
    act_bits: int = 8


def smooth_scales(act_max, weight_max, alpha: float):
    """s = max|X|^alpha / max|W|^(1 - alpha), as the reference clamps it (torch, float64)."""
    w = weight_max.double().clamp(min=1e-5)
    return (act_max.double().pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)


def weight_max(weights) -> object:
    """Per input channel, max |W| over the rows of every linear that shares the input."""
    import torch

    return torch.stack([W.abs().amax(dim=0) for W in weights]).amax(dim=0)


class SmoothQuant(ChooserBase):
    """The chooser: max|X| from add_batch, smoothing folded per layer, then per-channel int8 RTN."""

    name = "smoothquant"
    needs_calibration = True

    def __init__(self, cfg: SmoothQuantConfig):
        if not 0 <= cfg.alpha <= 1:
            raise UsageError(f"SmoothQuant's alpha must lie in [0, 1], got {cfg.alpha}")
        self.cfg = cfg
        self.rounding = RTN(cfg.grid)
        self.arch = None
        self.act_max: dict = {}

    def prepare(self, config) -> None:
        self.arch = archs.arch_for(config, "SmoothQuant")

    def add_batch(self, name: str, X) -> None:
        import torch

        X = X.reshape(-1, X.shape[-1])
        if not torch.isfinite(X).all():
            raise InputError(f"{name}: the calibration activations hold NaN or Inf")
        m = X.abs().amax(dim=0).float()
        self.act_max[name] = m if name not in self.act_max else torch.maximum(self.act_max[name], m)

    def transform_layer(self, layer, inputs, prefix: str) -> None:
        if self.arch is None:
            raise UsageError("SmoothQuant.prepare(config) was not called: the architecture is unknown")
        for g in self.arch.norm_groups:
            name = prefix + g.linears[0]
            if name not in self.act_max:
                raise UsageError(f"SmoothQuant got no calibration inputs for {name}")
            mods = [archs.submodule(layer, n) for n in g.linears]
            s = smooth_scales(self.act_max[name], weight_max([m.weight.data for m in mods]), self.cfg.alpha)
            archs.fold_into_prev(archs.submodule(layer, g.prev), s, is_norm=True, norm_offset=self.arch.norm_offset)
            for m in mods:
                archs.scale_inputs(m, s)
        for n in list(self.act_max):
            if n.startswith(prefix):
                del self.act_max[n]

    def quantize(self, name: str, W: np.ndarray) -> QuantResult:
        return self.rounding.quantize(name, W)
