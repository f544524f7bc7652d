"""The affine grid: x ~= scale * (q - zero), q an unsigned integer code of `bits` bits.

One signature for every granularity, as torchao's ``quantize_affine`` does:
the ``block_size`` tuple (one entry per dimension of x) says which elements
share a (scale, zero) pair. For a weight of shape (out, in):

    block_size      granularity                 scale/zero shape
    (out, in)       per tensor                  (1, 1)
    (1, in)         per output channel (row)    (out, 1)
    (1, g)          per group of g input cols   (out, ceil(in / g))

An entry of -1 means "the whole dimension". A block that does not divide its
dimension leaves a narrower last block (576 columns in groups of 128 give four
groups of 128 and one of 64); nothing is padded.

Grid conventions (the GPTQ reference's ``Quantizer.find_params`` and torchao's
``choose_qparams_affine``):
  * asymmetric: the range is widened to include 0, [min(x_min, 0), max(x_max, 0)],
    scale = range / (2^bits - 1), zero = round(-x_min / scale); 0 is on the grid
    and a constant block is reproduced exactly at its grid end;
  * symmetric:  scale = 2 * max|x| / (2^bits - 1), zero = 2^(bits - 1) (GPTQ's
    (maxq + 1) / 2), so 0 is exact and the codes stay unsigned;
  * zero domain "int" rounds zero to an integer (what GPTQ/AWQ checkpoints store),
    "float" keeps it real (q = round(x / scale + zero));
  * a block whose scale would be 0 (all zeros, or a range that underflows
    float32) gets scale 1: its values round to 0 with error below scale / 2;
  * scale_dtype "float16" rounds every scale to the nearest float16 before the
    zero and the codes are computed from it, so the grid is exactly the one a
    checkpoint with fp16 scales (GPTQ, AWQ, compressed-tensors) stores; a scale
    above float16's range is refused, one that underflows it becomes 1 as above;
  * min_zero (asymmetric, integer zero) keeps every zero >= min_zero: GPTQ's v1
    checkpoints store zero - 1 and cannot hold a zero of 0. A block whose zero
    would round below min_zero gets its grid widened downwards instead,
    scale = max(x_max / (2^bits - 1 - min_zero), -x_min / min_zero), so the
    block's range still fits and zero = min_zero.
Scale/zero come from min-max or from an MSE clip search that shrinks the range
by factors 1, 1 - 1/grid, ... (GPTQ's ``mse`` option, norm 2.4 there, 2 here).

NaN or Inf in the input is refused with InputError: there is no meaningful
code for it, and silently producing one would poison every later number.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

from qkit.errors import InputError, UsageError

ZeroDomain = Literal["int", "float"]
Method = Literal["minmax", "mse"]
ScaleDType = Literal["float32", "float16"]


@dataclass(frozen=True)
class AffineConfig:
    """What the CLI builds from --bits/--group-size and checkpoints record."""

    bits: int = 4
    group_size: int | None = 128  # None: one group per row (per-channel)
    symmetric: bool = False
    zero_domain: ZeroDomain = "int"
    method: Method = "minmax"
    scale_dtype: ScaleDType = "float32"  # "float16": scales rounded to fp16 (what packed checkpoints store)
    min_zero: int = 0  # 1 for GPTQ v1 checkpoints (they store zero - 1)

    def block_size(self, shape: Sequence[int]) -> tuple[int, ...]:
        return (1,) * (len(shape) - 1) + ((self.group_size or -1),)


@dataclass(frozen=True)
class AffineQuantized:
    """Codes plus the parameters that decode them."""

    codes: np.ndarray  # uint8, shape of the input
    scale: np.ndarray  # float32, one per block
    zero: np.ndarray  # int32 (zero_domain "int") or float32 ("float"), one per block
    bits: int
    block_size: tuple[int, ...]

    def dequantize(self, dtype=np.float32) -> np.ndarray:
        return dequantize(self.codes, self.scale, self.zero, self.block_size, dtype=dtype)


# ------------------------------------------------------------------ blocks
def normalize_block_size(shape: Sequence[int], block_size: Sequence[int] | int) -> tuple[int, ...]:
    """Resolve -1 entries and check the tuple against the shape; an int g means (1, ..., 1, g)."""
    shape = tuple(int(s) for s in shape)
    if isinstance(block_size, (int, np.integer)):
        block_size = (1,) * (len(shape) - 1) + (int(block_size),)
    bs = tuple(int(b) for b in block_size)
    if len(bs) != len(shape):
        raise UsageError(f"block_size {bs} has {len(bs)} entries, the tensor has {len(shape)} dims {shape}")
    out = []
    for b, n in zip(bs, shape):
        if b == -1:
            b = max(n, 1)
        if b < 1:
            raise UsageError(f"block_size entries must be >= 1 or -1, got {bs}")
        out.append(min(b, max(n, 1)))
    return tuple(out)


def n_blocks(shape: Sequence[int], block_size: Sequence[int]) -> tuple[int, ...]:
    """Blocks per dimension: ceil(n / b), the last one possibly narrower."""
    return tuple(-(-int(n) // int(b)) for n, b in zip(shape, block_size))


def block_reduce(ufunc: np.ufunc, x: np.ndarray, block_size: Sequence[int]) -> np.ndarray:
    """Reduce every block of x with ufunc (np.minimum, np.maximum, np.add); ragged last blocks included."""
    if all(n % b == 0 for n, b in zip(x.shape, block_size)) and x.size:
        # blocks tile x exactly: one reshape, one reduction over the in-block axes
        split = [v for n, b in zip(x.shape, block_size) for v in (n // b, b)]
        return ufunc.reduce(x.reshape(split), axis=tuple(range(1, 2 * x.ndim, 2)))
    out = x
    for ax, b in enumerate(block_size):
        n = x.shape[ax]
        if b == 1 or n == 0:
            continue
        out = ufunc.reduceat(out, np.arange(0, n, b), axis=ax)
    return out


def block_expand(p: np.ndarray, shape: Sequence[int], block_size: Sequence[int]) -> np.ndarray:
    """Broadcast per-block parameters back to the elements they cover."""
    shape = tuple(shape)
    if all(n % b == 0 for n, b in zip(shape, block_size)):
        split = [v for n, b in zip(shape, block_size) for v in (n // b, b)]
        view = np.asarray(p).reshape([v for n, b in zip(shape, block_size) for v in (n // b, 1)])
        return np.broadcast_to(view, split).reshape(shape)
    out = p
    for ax, (n, b) in enumerate(zip(shape, block_size)):
        if b == 1:
            continue
        nb = -(-n // b)
        counts = np.full(nb, b, dtype=np.intp)
        if nb:
            counts[-1] = n - b * (nb - 1)
        out = np.repeat(out, counts, axis=ax)
    return out


# ------------------------------------------------------------------ checks
def _as_float(x) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind not in "fiu":
        raise InputError(f"expected a real numeric array, got dtype {x.dtype}")
    x = x.astype(np.promote_types(x.dtype, np.float32), copy=False) if x.dtype.kind == "f" else x.astype(np.float32)
    if x.size and not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x))[0]
        raise InputError(f"input contains NaN or Inf (first at index {tuple(int(i) for i in bad)}); "
                         "clean or mask it before quantizing")
    return x


def _check_bits(bits: int) -> int:
    if not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 8:
        raise UsageError(f"bits must be an integer in 2..8, got {bits!r}")
    return int(bits)


# ------------------------------------------------------------------ qparams
def qparams_from_range(xmin: np.ndarray, xmax: np.ndarray, bits: int, *, symmetric: bool = False,
                       zero_domain: ZeroDomain = "int", scale_dtype: ScaleDType = "float32",
                       min_zero: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero for blocks whose values span [xmin, xmax] (arrays of per-block extremes)."""
    maxq = 2**bits - 1
    ftype = np.result_type(xmin, np.float32)  # float32, or float64 for float64 input
    # the range in float64: max - min of two large float32 values can overflow float32
    xmin = np.minimum(np.asarray(xmin, np.float64), 0)
    xmax = np.maximum(np.asarray(xmax, np.float64), 0)
    if np.any(xmax - xmin > np.finfo(ftype).max):
        raise InputError(f"a block's range exceeds the largest {np.dtype(ftype).name}; cannot place a grid on it")
    if not 0 <= min_zero < maxq:
        raise UsageError(f"min_zero must lie in [0, {maxq - 1}] for {bits} bits, got {min_zero}")
    if symmetric:
        amax = np.maximum(-xmin, xmax)
        scale = 2 * amax / maxq
    else:
        scale = (xmax - xmin) / maxq
        if min_zero:
            with np.errstate(divide="ignore", invalid="ignore"):
                low = np.round(-xmin / np.where(scale > 0, scale, 1)) < min_zero
            scale = np.where(low, np.maximum(xmax / (maxq - min_zero), -xmin / min_zero), scale)
    scale = _round_scale(scale.astype(ftype), scale_dtype)
    if symmetric:
        zero = np.full(scale.shape, (maxq + 1) // 2, dtype=ftype)
    else:
        zero = (-xmin / scale).astype(ftype)
    if zero_domain == "int":
        zero = np.clip(np.round(zero), min_zero, maxq).astype(np.int32)
    elif zero_domain == "float":
        zero = np.maximum(zero, min_zero).astype(ftype, copy=False) if min_zero else zero
    else:
        raise UsageError(f"zero_domain must be 'int' or 'float', got {zero_domain!r}")
    return scale, zero


def _round_scale(scale: np.ndarray, scale_dtype: ScaleDType) -> np.ndarray:
    """Zero scales become 1; with scale_dtype float16, every scale is rounded to the nearest float16 value."""
    if scale_dtype == "float16":
        with np.errstate(over="ignore"):
            s16 = scale.astype(np.float16)
        if np.isinf(s16).any():
            raise InputError(f"a block's scale {float(scale.max()):.4g} exceeds float16's range (65504); "
                             "the weights are too large for fp16 scales")
        scale = s16.astype(scale.dtype)
    elif scale_dtype != "float32":
        raise UsageError(f"scale_dtype must be 'float32' or 'float16', got {scale_dtype!r}")
    return np.where(scale > 0, scale, 1).astype(scale.dtype)


def choose_qparams(x, bits: int, block_size, *, symmetric: bool = False, zero_domain: ZeroDomain = "int",
                   method: Method = "minmax", grid: int = 100, maxshrink: float = 0.8,
                   norm: float = 2.0, scale_dtype: ScaleDType = "float32",
                   min_zero: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-block scale and zero for x.

    method="mse" tries the range shrunk by p = 1, 1 - 1/grid, ... down to
    1 - maxshrink and keeps, per block, the p whose dequantized block has the
    least sum |x_hat - x|^norm (GPTQ reference, ``Quantizer.find_params``).
    """
    bits = _check_bits(bits)
    x = _as_float(x)
    bs = normalize_block_size(x.shape, block_size)
    xmin = block_reduce(np.minimum, x, bs)
    xmax = block_reduce(np.maximum, x, bs)
    kw = dict(symmetric=symmetric, zero_domain=zero_domain, scale_dtype=scale_dtype, min_zero=min_zero)
    scale, zero = qparams_from_range(xmin, xmax, bits, **kw)
    if method == "minmax":
        return scale, zero
    if method != "mse":
        raise UsageError(f"method must be 'minmax' or 'mse', got {method!r}")
    best = np.full(scale.shape, np.inf, dtype=np.float64)
    for i in range(int(maxshrink * grid)):
        p = 1 - i / grid
        s1, z1 = qparams_from_range(p * xmin, p * xmax, bits, **kw)
        err = np.abs(_grid_roundtrip(x, s1, z1, bits, bs) - x) ** norm
        err = block_reduce(np.add, err, bs)
        better = err < best
        best = np.where(better, err, best)
        scale = np.where(better, s1, scale)
        zero = np.where(better, z1, zero)
    return scale, zero


# ------------------------------------------------------------------ grid maps
def _codes(x: np.ndarray, scale, zero, bits: int, bs) -> np.ndarray:
    s = block_expand(np.asarray(scale), x.shape, bs)
    z = block_expand(np.asarray(zero), x.shape, bs)
    return np.clip(np.round(x / s + z), 0, 2**bits - 1)


def _grid_roundtrip(x: np.ndarray, scale, zero, bits: int, bs) -> np.ndarray:
    """Checked-once inner step of the clip search: x -> codes -> values, in x's float type."""
    s = block_expand(np.asarray(scale), x.shape, bs)
    z = block_expand(np.asarray(zero, dtype=np.float32), x.shape, bs)
    return s * (np.clip(np.round(x / s + z), 0, 2**bits - 1) - z)


def quantize(x, scale: np.ndarray, zero: np.ndarray, bits: int, block_size) -> np.ndarray:
    """q = clamp(round(x / scale + zero), 0, 2^bits - 1) as uint8 (round half to even, as torch.round)."""
    bits = _check_bits(bits)
    x = _as_float(x)
    bs = normalize_block_size(x.shape, block_size)
    return _codes(x, scale, zero, bits, bs).astype(np.uint8)


def dequantize(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, block_size, dtype=np.float32) -> np.ndarray:
    """x_hat = scale * (q - zero)."""
    codes = np.asarray(codes)
    bs = normalize_block_size(codes.shape, block_size)
    ftype = np.result_type(np.asarray(scale).dtype, np.float32)  # float64 parameters decode in float64
    s = block_expand(np.asarray(scale, dtype=ftype), codes.shape, bs)
    z = block_expand(np.asarray(zero, dtype=ftype), codes.shape, bs)
    return (s * (codes.astype(ftype) - z)).astype(dtype, copy=False)


def fake_quantize(x, scale, zero, bits: int, block_size) -> np.ndarray:
    """dequantize(quantize(x)): the values the grid gives back."""
    x = np.asarray(x)
    return dequantize(quantize(x, scale, zero, bits, block_size), scale, zero, block_size,
                      dtype=np.promote_types(x.dtype, np.float32))


def quantize_affine(x, bits: int = 4, block_size=128, *, symmetric: bool = False, zero_domain: ZeroDomain = "int",
                    method: Method = "minmax", **search) -> AffineQuantized:
    """Choose parameters and quantize in one call (round-to-nearest on the affine grid)."""
    x = _as_float(x)
    bs = normalize_block_size(x.shape, block_size)
    scale, zero = choose_qparams(x, bits, bs, symmetric=symmetric, zero_domain=zero_domain, method=method, **search)
    return AffineQuantized(quantize(x, scale, zero, bits, bs), scale, zero, int(bits), bs)
