"""What every packed-checkpoint format shares: the export spec, the checks on a chooser's result, the registry.

A format module (gptq.py, awq.py, compressed_tensors.py) supplies one class with

    check(spec)                      refuse, before any work, what the format cannot hold (bits, act-order, ...)
    pack(name, res, spec) -> dict    one linear's QuantResult -> its checkpoint tensors (numpy / torch)
    quantization_config(spec, ignore) -> dict   the ``quantization_config`` entry of config.json
    matches(qcfg) -> bool            whether a config.json ``quantization_config`` is this format's
    marker                           the suffix that marks a packed linear (".qweight", ".weight_packed")
    parts(base, keys) -> list        the tensor names one packed linear occupies
    dequantize(get, base, qcfg)      -> (out, in) float32 torch weight, shapes checked

Every format stores codes, integer zeros and fp16 scales; a QuantResult is
exportable when its scales are fp16 values (AffineConfig(scale_dtype="float16"))
and its zeros integers, so the checkpoint dequantizes to exactly the weights
qkit holds in memory: scale * (code - zero), one rounding, in float32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from qkit.errors import FormatError, InputError, UsageError

FORMATS = ("gptq", "gptq_v2", "awq", "compressed-tensors")


@dataclass(frozen=True)
class ExportSpec:
    """How a model was quantized, as the packed formats record it (the CLI's flags, the chooser's config)."""

    format: str
    bits: int
    group_size: int | None  # None: one group per row
    symmetric: bool = False
    act_order: bool = False
    static_groups: bool = False
    damp: float | None = None  # GPTQ's dampening, recorded when the chooser was GPTQ
    method: str = "rtn"
    act_bits: int | None = None  # per-token dynamic int activations (W8A8): compressed-tensors int-quantized
    group_aware: bool = False  # act-order inside contiguous groups: g_idx = i // group_size, as static groups
    true_sequential: bool = False  # GPTQ: each layer's linear groups calibrated in order on the quantized ones

    @property
    def dynamic_groups(self) -> bool:
        """act-order without static groups: g_idx is a permutation of groups, not i // group_size."""
        return self.act_order and not self.static_groups and not self.group_aware

    @classmethod
    def from_chooser(cls, fmt: str, chooser, act_bits: int | None = None) -> ExportSpec:
        """The chooser's own statement of how it quantized (qkit.chooser: export_spec)."""
        return chooser.export_spec(fmt, act_bits)


def grid_requirements(fmt: str) -> dict:
    """The AffineConfig/GPTQConfig fields a format needs: fp16 scales, and zeros >= 1 for GPTQ v1."""
    return {"scale_dtype": "float16", "min_zero": 1 if fmt == "gptq" else 0}


def check_chooser(fmt: str, chooser) -> None:
    """Refuse a chooser whose grid the format cannot store exactly (before any layer is quantized)."""
    c = chooser.affine_grid
    if c is None:
        raise UsageError(f"--format {fmt} needs an affine-grid chooser (rtn, gptq, awq, smoothquant), not {chooser.name}")
    if c.scale_dtype != "float16":
        raise UsageError(f"{fmt} checkpoints store fp16 scales: quantize with scale_dtype='float16' so the "
                         "exported model is the in-memory one")
    if c.zero_domain != "int":
        raise UsageError(f"{fmt} checkpoints store integer zeros; zero_domain must be 'int'")
    if fmt == "gptq" and not c.symmetric and c.min_zero < 1:
        raise UsageError("GPTQ v1 checkpoints store zero - 1, so every zero must be >= 1: quantize with "
                         "min_zero=1, or write --format gptq_v2")


# ------------------------------------------------------------------ checks on one linear
def fp16_scales(name: str, scale: np.ndarray) -> np.ndarray:
    """The scales as float16, refusing any that float16 does not hold exactly."""
    s = np.asarray(scale)
    with np.errstate(over="ignore"):
        s16 = s.astype(np.float16)
    if not np.array_equal(s16.astype(s.dtype), s):
        bad = int(np.argmax(s16.astype(s.dtype) != s))
        raise InputError(f"{name}: scale {float(s.reshape(-1)[bad])!r} is not a float16 value; the packed formats "
                         "store fp16 scales, so quantize with scale_dtype='float16'")
    return s16


def int_zeros(name: str, zero: np.ndarray, bits: int) -> np.ndarray:
    z = np.asarray(zero)
    if z.dtype.kind == "f" and not np.array_equal(z, np.round(z)):
        raise InputError(f"{name}: zeros are not integers (zero_domain 'float'); the packed formats store "
                         "integer zeros")
    z = z.astype(np.int64)
    if z.size and (z.min() < 0 or z.max() > 2**bits - 1):
        raise InputError(f"{name}: zeros outside [0, {2**bits - 1}]")
    return z


def contiguous_groups(g_idx: np.ndarray, group_size: int | None) -> bool:
    n = len(g_idx)
    return np.array_equal(np.asarray(g_idx), np.arange(n) // (group_size or max(n, 1)))


def check_groups(fmt: str, name: str, in_features: int, group_size: int | None, consumer: str) -> None:
    """Formats whose readers reshape rows into (in / group, group) cannot hold a ragged last group."""
    if group_size and in_features % group_size:
        raise UsageError(f"{name}: {in_features} input columns leave a last group of {in_features % group_size} "
                         f"with group size {group_size}; {fmt} cannot represent a ragged group ({consumer}). "
                         f"Use a group size that divides every layer's input width ({in_features} here), "
                         "-1 (per channel), or --format gptq / gptq_v2, whose g_idx holds ragged groups")


def check_result(name: str, res, spec: ExportSpec) -> None:
    if res.bits != spec.bits:
        raise InputError(f"{name}: quantized at {res.bits} bits, the export says {spec.bits}")
    out, inp = res.codes.shape
    if res.scale.shape[0] != out or res.zero.shape != res.scale.shape or res.g_idx.shape != (inp,):
        raise InputError(f"{name}: codes {res.codes.shape}, scales {res.scale.shape}, zeros {res.zero.shape} and "
                         f"g_idx {res.g_idx.shape} do not agree")


def shape_error(name: str, what: str) -> FormatError:
    return FormatError(f"{name}: inconsistent packed tensors ({what})")


def as_numpy(t) -> np.ndarray:
    import torch

    return t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


class AffineTensors(NamedTuple):
    """A packed linear decoded to its affine grid, as every reader returns it (the runtime's input):
    codes (out, in) uint8 in 0 .. 2^bits - 1, scale (out, n_groups) float32, zero (out, n_groups) int32,
    g_idx (in,) int64, and W[o, i] = scale[o, g_idx[i]] * (codes[o, i] - zero[o, g_idx[i]])."""
    codes: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    g_idx: np.ndarray
    bits: int

    def dequantize(self):
        return dequantize_groups(self.codes, self.scale, self.zero, self.g_idx)


def dequantize_groups(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, g_idx: np.ndarray):
    """W[o, i] = scale[o, g(i)] * (codes[o, i] - zero[o, g(i)]) in float32: qkit's in-memory arithmetic.

    codes (out, in), scale/zero (out, n_groups); (codes - zero) is exact in float32, the product is
    rounded once, as affine.dequantize and GPTQ's grid compute it.
    """
    import torch

    gi = np.asarray(g_idx, dtype=np.int64)
    s = np.asarray(scale, dtype=np.float32)[:, gi]
    z = np.asarray(zero, dtype=np.float32)[:, gi]
    return torch.from_numpy(np.ascontiguousarray(s * (codes.astype(np.float32) - z)))


def check_g_idx(name: str, g_idx: np.ndarray, n_groups: int, in_features: int) -> np.ndarray:
    g = np.asarray(g_idx)
    if g.shape != (in_features,):
        raise shape_error(name, f"g_idx has shape {g.shape}, expected ({in_features},)")
    if g.size and (g.min() < 0 or g.max() >= n_groups):
        raise shape_error(name, f"g_idx values outside [0, {n_groups}) for {n_groups} groups of scales")
    return g.astype(np.int64)
