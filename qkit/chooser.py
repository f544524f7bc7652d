"""The chooser contract: what the layer pipeline asks of a quantization method.

A *grid* is the set of values a weight may take (affine groups, GGML blocks); a
*chooser* picks, for each weight matrix, the point of its grid that stands for it
(RTN: the nearest; GPTQ: with error feedback from calibration; AWQ: after scaling).
qkit.pipeline drives a chooser through this protocol and nothing else:

    prepare(config)                         once, before any work: check the model
    add_batch(name, X[, X_float])           calibration inputs of one linear (needs_calibration)
    transform_layer(layer, inputs, prefix)  a layer-level step in float (None: none)
    quantize(name, W) -> QuantResult        one linear's weights, (out, in) float32
    export_spec(fmt, act_bits) -> ExportSpec  how a packed checkpoint records the method
    affine_grid -> AffineConfig | None      the affine grid its results lie on (None: GGML blocks)

and reads its flags: ``needs_calibration``; ``propagate_float`` (the next layer
calibrates on the float layer's outputs, AWQ); ``needs_float_inputs`` (add_batch
also gets the float model's inputs, GPTAQ); ``true_sequential`` (a layer's linear
groups calibrated in order, GPTQ). ChooserBase gives every hook its neutral
default, so a method states only what it does.

A method's config holds its grid as a field (``GPTQConfig(grid=AffineConfig(bits=3))``), never copies of the
grid's fields; a chooser that rounds with another chooser (AWQ, SmoothQuant) names it ``rounding``.

Calibration statistics are reductions over tokens, so slices of the calibration set (several workers) combine
into the statistics of all of them: GPTQ's H is a token mean with its count (qkit.gptq.merge_hessians), AWQ's
sum |x| and count add up, SmoothQuant's max |x| is a max, the imatrix's sum x^2 and count add up
(qkit.imatrix.merge). qkit.pipeline.LayerWalk is the layer walk (place, yield, propagate, release) they share.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from qkit.errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    from qkit.affine import AffineConfig
    from qkit.export.common import ExportSpec

__all__ = ["Chooser", "ChooserBase", "QuantResult"]


@dataclass(frozen=True)
class QuantResult:
    """What a chooser produced for one weight matrix (out, in) on an affine grid."""

    weight: np.ndarray  # the dequantized (fake-quantized) weight, float32, shape (out, in)
    codes: np.ndarray  # uint8 codes, shape (out, in)
    scale: np.ndarray  # (out, n_groups)
    zero: np.ndarray  # (out, n_groups)
    g_idx: np.ndarray  # (in,) group of each input column
    bits: int
    symmetric: bool = False


@dataclass
class BlockResult:
    """What a chooser produced for one weight matrix (out, in) in a GGML block type (qkit.gptq_ggml).

    The blocks are the bytes the GGUF stores (llama.cpp's layout, qkit.ggml); weight is what they decode
    to. A linear the mix keeps in F32/F16 has no blocks, its weight rounded to that float type.
    """

    weight: np.ndarray  # float32 (out, in): ggml.dequantize(blocks), or the float-typed weight
    qtype: str  # a GGML type name (q4_K, ...) or "f32" / "f16"
    blocks: np.ndarray | None  # uint8 (out, in / block_size * type_size); None for a float type

    @property
    def stored_bits(self) -> int:
        """What the GGUF holds for this matrix, every scale and min included."""
        if self.blocks is None:
            return self.weight.size * (16 if self.qtype == "f16" else 32)
        return self.blocks.size * 8


@runtime_checkable
class Chooser(Protocol):
    name: str
    needs_calibration: bool
    propagate_float: bool
    needs_float_inputs: bool
    true_sequential: bool
    transform_layer: object  # a method (layer, inputs, prefix) -> None, or None

    @property
    def affine_grid(self) -> AffineConfig | None: ...

    def prepare(self, config) -> None: ...

    def add_batch(self, name: str, X, X_float=None) -> None: ...

    def quantize(self, name: str, W: np.ndarray) -> QuantResult | BlockResult: ...

    def export_spec(self, fmt: str, act_bits: int | None = None) -> ExportSpec: ...


class ChooserBase:
    """Neutral defaults for every hook of the contract; a subclass gives name, cfg and quantize (the one method
    with no default: it is the method itself)."""

    name = "chooser"
    needs_calibration = False
    propagate_float = False
    needs_float_inputs = False
    true_sequential = False
    transform_layer = None  # no layer-level step

    @property
    def affine_grid(self) -> AffineConfig | None:
        """The affine grid of the results: the method config's grid (``self.cfg.grid``)."""
        return self.cfg.grid

    def prepare(self, config) -> None:
        """Check the model before any work (an architecture table, say); nothing by default."""

    def add_batch(self, name: str, X, X_float=None) -> None:
        """A data-free chooser (needs_calibration False) is never handed calibration inputs."""
        raise UsageError(f"method {self.name} takes no calibration inputs (got some for {name})")

    def export_spec(self, fmt: str, act_bits: int | None = None) -> ExportSpec:
        """The affine grid as a packed format records it; methods with more to say extend it."""
        from qkit.export.common import ExportSpec

        c = self.affine_grid
        if c is None:
            raise UsageError(f"--format {fmt} stores affine grids; method {self.name} writes GGML blocks")
        return ExportSpec(fmt, c.bits, c.group_size, c.symmetric, method=self.name, act_bits=act_bits)
