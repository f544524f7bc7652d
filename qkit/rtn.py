"""RTN: each weight goes to the nearest point of its grid (no calibration data).

The baseline every chooser is compared with; on the affine grid it is
qkit.affine.quantize_affine per output row, groups along the input dimension.
"""
from __future__ import annotations

import numpy as np

from qkit import affine
from qkit.chooser import ChooserBase, QuantResult

__all__ = ["RTN", "QuantResult", "group_index"]


def group_index(in_features: int, group_size: int | None) -> np.ndarray:
    """g_idx[i] = i // g (ceil(in / g) groups, the last one possibly narrower)."""
    g = group_size or in_features
    return (np.arange(in_features) // g).astype(np.int32)


class RTN(ChooserBase):
    """Round-to-nearest on the affine grid of `cfg`."""

    name = "rtn"
    needs_calibration = False

    def __init__(self, cfg: affine.AffineConfig):
        self.cfg = cfg

    @property
    def affine_grid(self) -> affine.AffineConfig:
        return self.cfg  # RTN's config is its grid

    def quantize(self, name: str, W: np.ndarray) -> QuantResult:
        c = self.cfg
        q = affine.quantize_affine(W, c.bits, c.block_size(W.shape), symmetric=c.symmetric,
                                   zero_domain=c.zero_domain, method=c.method, scale_dtype=c.scale_dtype,
                                   min_zero=c.min_zero)
        return QuantResult(q.dequantize(), q.codes, q.scale, q.zero, group_index(W.shape[1], c.group_size), c.bits,
                           c.symmetric)
