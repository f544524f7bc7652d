"""A GGML block type as a grid for GPTQ: llama.cpp's search picks a block's levels, GPTQ picks the codes.

A GGML block runs along the input dimension of a weight (a row of `out x in`), as
GPTQ's groups do, so a block (32 weights for the legacy types, a 256-weight
super-block for the K types) is a GPTQ group. When GPTQ reaches a block's first
column it calls ``params(W_block, start)``: the block's scales and mins come from
the very search llama.cpp's quantizer runs (``quantize_row_<type>_ref``, or the
``_impl`` twin with an importance matrix; qkit.ggml reproduces both byte for byte)
on the weights as they stand then. That fixes, for every weight, the levels of
its (sub-)block,

    x = a * (c - z) - m,    c = lo .. hi

(a = d * sub-block scale, m = dmin * sub-block min or 0, z the type's code offset),
and ``quantize(w, p, k)`` then takes for column k the nearest level, clamped to
the code range; GPTQ spreads the rounding error over the columns not yet done.
``pack`` writes the codes into the blocks the search produced (only the code
fields change), so the result is bit-valid GGML whose dequantization is exactly
the values GPTQ used: a * (c - z) - m is evaluated in float32 in the dequantizers'
own order (every product of an fp16 scale and a 6-bit integer is exact in float32).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from qkit import ggml
from qkit.errors import InputError
from qkit.ggml import search
from qkit.ggml.blocks import _f16, _nibbles_halves, _qh_bits, fp16
from qkit.ggml.kquants import _pack_2bit, unpack_scale_min_k4

f32 = np.float32

# type -> (code offset z, lowest code, highest code, weights per sub-block sharing a scale)
CODES = {"q4_0": (8, 0, 15, 32), "q4_1": (0, 0, 15, 32), "q5_0": (16, 0, 31, 32), "q5_1": (0, 0, 31, 32),
         "q8_0": (0, -128, 127, 32), "q2_K": (0, 0, 3, 16), "q3_K": (4, 0, 7, 16), "q4_K": (0, 0, 15, 32),
         "q5_K": (0, 0, 31, 32), "q6_K": (32, 0, 63, 16)}
# the legacy types' importance-weighted searches (quantize_row_<type>_impl): (nmax, affine)
LEGACY_IMPL = {"q4_0": (8, False), "q5_0": (16, False), "q4_1": (15, True), "q5_1": (31, True)}


@njit(cache=True, nogil=True)
def _legacy_impl_blocks(x, qw, sigma2, nmax, affine, d, m):
    """quantize_row_q4_0_impl .. q5_1_impl for one 32-column block of every row, with the row statistic
    sigma2 (mean x^2 of the row) given: per row, weights qw * sqrt(sigma2 + x^2), then make_qx_quants
    (symmetric) or make_qkx3_quants(-0.9, 0.05, 36) (affine; m receives the stored minimum)."""
    weight = np.empty(32, dtype=np.float32)
    L = np.empty(32, dtype=np.int32)
    Laux = np.empty(32, dtype=np.int32)
    wbuf = np.empty(32, dtype=np.float32)
    for r in range(x.shape[0]):
        search._importance(x[r], qw, sigma2[r], weight)
        if affine:
            s, mn = search.make_qkx3_quants(x[r], weight, nmax, L, Laux, np.float32(-0.9), np.float32(0.05), 36,
                                            False)
            d[r] = s
            m[r] = -mn
        else:
            d[r] = search.make_qx_quants(x[r], nmax, L, 1, weight, True, wbuf)
            m[r] = np.float32(0)


def levels(t: str, blocks: np.ndarray):
    """(a, m) float32 (n, block_size): each weight's level spacing and minimum, read from the block bytes."""
    n = blocks.shape[0]
    if t in ("q4_0", "q5_0", "q8_0"):
        a = np.repeat(_f16(blocks[:, 0:2]), 32, axis=1)
        return a, np.zeros_like(a)
    if t in ("q4_1", "q5_1"):
        return np.repeat(_f16(blocks[:, 0:2]), 32, axis=1), np.repeat(-_f16(blocks[:, 2:4]), 32, axis=1)
    if t in ("q4_K", "q5_K"):
        sc, mn = unpack_scale_min_k4(blocks[:, 4:16])
        a = _f16(blocks[:, 0:2]) * sc.astype(f32)
        m = _f16(blocks[:, 2:4]) * mn.astype(f32)
        return np.repeat(a, 32, axis=1), np.repeat(m, 32, axis=1)
    if t == "q6_K":
        a = _f16(blocks[:, 208:210]) * blocks[:, 192:208].view(np.int8).astype(f32)
        return np.repeat(a, 16, axis=1), np.zeros((n, 256), f32)
    if t == "q2_K":
        sc = blocks[:, 0:16]
        a = _f16(blocks[:, 80:82]) * (sc & 0xF).astype(f32)
        m = _f16(blocks[:, 82:84]) * (sc >> 4).astype(f32)
        return np.repeat(a, 16, axis=1), np.repeat(m, 16, axis=1)
    if t == "q3_K":
        sc = blocks[:, 96:108]
        low = np.concatenate([sc[:, :8] & 0xF, sc[:, :8] >> 4], axis=1)
        hi = (sc[:, 8:].reshape(n, 1, 4) >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 4, 1)) & 3
        s = (low | (hi.reshape(n, 16) << 4)).astype(np.int8) - np.int8(32)
        return np.repeat(_f16(blocks[:, 108:110]) * s.astype(f32), 16, axis=1), np.zeros((n, 256), f32)
    raise InputError(f"no GGML grid for type {t!r}")


def pack_codes(t: str, blocks: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Write codes c (n, block_size; lo..hi) into the code fields of `blocks` (n, type_size); returns a copy."""
    b = blocks.copy()
    n = b.shape[0]
    c = np.asarray(c)
    if t == "q8_0":
        b[:, 2:34] = c.astype(np.int8).view(np.uint8)
        return b
    c = c.astype(np.uint8)
    if t == "q4_0":
        b[:, 2:18] = _nibbles_halves(c)
    elif t == "q4_1":
        b[:, 4:20] = _nibbles_halves(c)
    elif t == "q5_0":
        b[:, 2:6] = _qh_bits(c)
        b[:, 6:22] = _nibbles_halves(c & 0x0F)
    elif t == "q5_1":
        b[:, 4:8] = _qh_bits(c)
        b[:, 8:24] = _nibbles_halves(c & 0x0F)
    elif t == "q4_K":  # in each 64-weight chunk: weight l low nibble, weight 32 + l high nibble
        L = c.reshape(n, 4, 2, 32)
        b[:, 16:144] = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(n, 128)
    elif t == "q5_K":
        L = c.reshape(n, 4, 2, 32)
        b[:, 48:176] = ((L[:, :, 0] & 0xF) | ((L[:, :, 1] & 0xF) << 4)).reshape(n, 128)
        shifts = (2 * np.arange(4, dtype=np.uint8)).reshape(1, 4, 1, 1) + np.array([0, 1], np.uint8).reshape(1, 1, 2, 1)
        b[:, 16:48] = ((L >> 4) << shifts).sum(axis=(1, 2), dtype=np.uint8)
    elif t == "q6_K":  # as quantize_row_q6_K_ref lays out ql / qh
        L = c.reshape(n, 2, 4, 32)
        lo = L & 0xF
        b[:, 0:128] = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)],
                                     axis=2).reshape(n, 128)
        b[:, 128:192] = ((L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4)
                         | ((L[:, :, 3] >> 4) << 6)).reshape(n, 64)
    elif t == "q2_K":
        b[:, 16:80] = _pack_2bit(c)
    elif t == "q3_K":  # third bit in hmask (bit w // 32 of byte w % 32), low two bits in qs
        high = (c > 3).astype(np.uint8).reshape(n, 8, 32)
        b[:, 0:32] = (high << np.arange(8, dtype=np.uint8).reshape(1, 8, 1)).sum(axis=1, dtype=np.uint8)
        b[:, 32:96] = _pack_2bit(np.where(c > 3, c - 4, c))
    else:
        raise InputError(f"no GGML grid for type {t!r}")
    return b


class GGMLGrid:
    """One weight matrix's GGML grid for qkit.gptq (a positional grid: blocks sit at fixed columns).

    imatrix: per-column importance (in,) or None (llama.cpp's reference search). For the legacy
    32-weight types llama.cpp's importance weights use sigma2 = mean x^2 of the whole row; GPTQ
    fixes it from the original rows (`row_sigma2`), since the row changes while GPTQ runs.
    """

    positional = True

    def __init__(self, qtype: str, in_features: int, imatrix=None, row_sigma2=None):
        self.t = ggml.get_type(qtype)
        self.name = self.t.name
        if self.name not in CODES:
            raise InputError(f"no GGML grid for type {qtype!r}")
        self.block_size = self.t.block_size
        if in_features % self.block_size:
            raise InputError(f"{self.name} needs rows whose length is a multiple of {self.block_size}, "
                             f"got {in_features}")
        self.z, self.lo, self.hi, _ = CODES[self.name]
        self.imatrix = None if imatrix is None or self.name == "q8_0" else np.asarray(imatrix, np.float32)
        if self.imatrix is not None and self.imatrix.shape != (in_features,):
            raise InputError(f"importance matrix has shape {self.imatrix.shape}, expected ({in_features},)")
        self.row_sigma2 = None if row_sigma2 is None else np.asarray(row_sigma2, np.float32)
        self.blocks: dict[int, np.ndarray] = {}  # first column -> the searched blocks (rows, type_size)

    def search(self, x: np.ndarray, start: int) -> np.ndarray:
        """The block bytes llama.cpp's search gives the columns start .. start + block_size of x (rows, bs)."""
        x = np.ascontiguousarray(x, np.float32)
        if not np.isfinite(x).all():
            raise InputError(f"{self.name}: weights hold NaN or Inf")
        im = None if self.imatrix is None else self.imatrix[start:start + self.block_size]
        if im is None:
            return self.t.quantize_blocks(x)
        if self.name in LEGACY_IMPL:
            nmax, affine = LEGACY_IMPL[self.name]
            sigma2 = self.row_sigma2 if self.row_sigma2 is not None else (x * x).mean(axis=1).astype(f32)
            d = np.empty(x.shape[0], f32)
            m = np.empty(x.shape[0], f32)
            _legacy_impl_blocks(x, np.ascontiguousarray(im), sigma2, nmax, affine, d, m)
            head = [fp16(d)[:, None].view(np.uint8)] + ([fp16(m)[:, None].view(np.uint8)] if affine else [])
            b = np.zeros((x.shape[0], self.t.type_size), np.uint8)
            b[:, :2 * len(head)] = np.concatenate(head, axis=1)
            return b
        return self.t.quantize_blocks(x, np.ascontiguousarray(np.broadcast_to(im, x.shape)))

    # ---- the grid protocol of qkit.gptq
    def params(self, Wg, start: int):
        """(a, m) torch (rows, block_size) in Wg's dtype for the block starting at column `start`."""
        import torch

        if Wg.shape[1] != self.block_size:
            raise InputError(f"{self.name}: a block of {Wg.shape[1]} columns, expected {self.block_size}")
        b = self.search(Wg.detach().cpu().to(torch.float32).numpy(), start)
        self.blocks[start] = b
        a, m = levels(self.name, b)
        return torch.from_numpy(a).to(Wg.dtype), torch.from_numpy(m).to(Wg.dtype)

    def quantize(self, w, p, k: int):
        """Column k of its block: nearest level a * (c - z) - m, c clamped to lo .. hi."""
        import torch

        a, m = p[0][:, k], p[1][:, k]
        nz = a != 0
        c = torch.where(nz, torch.round((w + m) / torch.where(nz, a, torch.ones_like(a))) + self.z,
                        torch.full_like(a, float(self.z)))
        c = torch.clamp(c, self.lo, self.hi)
        return a * (c - self.z) - m, c

    def pack(self, codes: np.ndarray) -> np.ndarray:
        """codes (rows, in) -> the GGML rows (rows, in / block_size * type_size), uint8."""
        rows, cols = codes.shape
        bs = self.block_size
        missing = [s for s in range(0, cols, bs) if s not in self.blocks]
        if missing:
            raise InputError(f"{self.name}: blocks at columns {missing[:3]} were never searched")
        out = [pack_codes(self.name, self.blocks[s], np.rint(codes[:, s:s + bs]).astype(np.int32))
               for s in range(0, cols, bs)]
        return np.stack(out, axis=1).reshape(rows, -1)
