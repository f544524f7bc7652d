"""K-quants: super-blocks of 256 weights with quantized sub-block scales (ggml-common.h, ggml-quants.c)."""
from __future__ import annotations

import numpy as np

from qkit.ggml import search
from qkit.ggml.blocks import BlockType, _f16, _head, fp16, nearest_int

f32 = np.float32
QK_K = 256


def pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins into 12 bytes (quantize_row_q4_K_ref; read back by get_scale_min_k4):

        bytes 0-3:  scale j (6 bits) | high 2 bits of scale j+4 in bits 6-7
        bytes 4-7:  min j   (6 bits) | high 2 bits of min j+4 in bits 6-7
        bytes 8-11: low 4 bits of scale j+4 | low 4 bits of min j+4 << 4
    """
    ls = ls.astype(np.uint8)
    lm = lm.astype(np.uint8)
    out = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return out


def unpack_scale_min_k4(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """get_scale_min_k4 for j = 0..7: (scales, mins) as uint8 (n, 8)."""
    s = np.empty((sc.shape[0], 8), np.uint8)
    m = np.empty((sc.shape[0], 8), np.uint8)
    s[:, :4] = sc[:, 0:4] & 63
    m[:, :4] = sc[:, 4:8] & 63
    s[:, 4:] = (sc[:, 8:12] & 0xF) | ((sc[:, 0:4] >> 6) << 4)
    m[:, 4:] = (sc[:, 8:12] >> 4) | ((sc[:, 4:8] >> 6) << 4)
    return s, m


class Q4_K(BlockType):
    """block_q4_K: d, dmin (fp16), scales[12] (8 x 6-bit scale and min), qs[128]; 4.5 bits per weight.

    x = d * sc_j * q - dmin * m_j in sub-block j of 32. quantize_row_q4_K_ref.
    """

    name, block_size, type_size = "q4_K", QK_K, 144

    def quantize_blocks(self, x):
        nb = x.shape[0]
        sub = np.ascontiguousarray(x.reshape(nb * 8, 32), dtype=np.float32)
        scales = np.empty(nb * 8, np.float32)
        mins = np.empty(nb * 8, np.float32)
        L = np.empty((nb * 8, 32), np.int32)
        search.q4k_subblocks(sub, scales, mins, L)
        scales, mins, L = scales.reshape(nb, 8), mins.reshape(nb, 8), L.reshape(nb, 8, 32)
        max_scale = np.maximum(scales.max(axis=1), f32(0))  # C scans from 0 with a strict '>'
        max_min = np.maximum(mins.max(axis=1), f32(0))
        with np.errstate(divide="ignore"):
            inv_scale = np.where(max_scale > 0, f32(63) / np.where(max_scale > 0, max_scale, f32(1)), f32(0))
            inv_min = np.where(max_min > 0, f32(63) / np.where(max_min > 0, max_min, f32(1)), f32(0))
        ls = np.minimum(63, nearest_int(inv_scale.astype(f32)[:, None] * scales).astype(np.uint8))
        lm = np.minimum(63, nearest_int(inv_min.astype(f32)[:, None] * mins).astype(np.uint8))
        d16 = fp16(max_scale / f32(63))
        dmin16 = fp16(max_min / f32(63))
        packed = pack_scale_min_k4(ls, lm)
        sc, m = unpack_scale_min_k4(packed)
        d = d16.astype(np.float32)[:, None] * sc.astype(np.float32)  # (nb, 8)
        dm = dmin16.astype(np.float32)[:, None] * m.astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            l = nearest_int(np.where(d[:, :, None] != 0, (x.reshape(nb, 8, 32) + dm[:, :, None]) /
                                     np.where(d[:, :, None] != 0, d[:, :, None], f32(1)), f32(0)))
        # `if (!d) continue;`: such a sub-block keeps the codes of the first pass
        L = np.where(d[:, :, None] != 0, np.clip(l, 0, 15), L).reshape(nb, 4, 2, 32).astype(np.uint8)
        qs = (L[:, :, 0, :] | (L[:, :, 1, :] << 4)).reshape(nb, 128)
        return np.concatenate([d16[:, None].view(np.uint8), dmin16[:, None].view(np.uint8), packed, qs], axis=1)

    def dequantize_blocks(self, b):
        nb = b.shape[0]
        d, dmin, scales, qs = _head(b, 2, 2, 12, 128)
        sc, m = unpack_scale_min_k4(scales)
        d = (_f16(d) * sc.astype(np.float32)).reshape(nb, 8, 1)
        dm = (_f16(dmin) * m.astype(np.float32)).reshape(nb, 8, 1)
        q = qs.reshape(nb, 4, 1, 32)
        q = np.concatenate([q & 0xF, q >> 4], axis=2).reshape(nb, 8, 32).astype(np.float32)
        return (d * q - dm).reshape(nb, QK_K)


class Q6_K(BlockType):
    """block_q6_K: ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] int8, d (fp16); 6.5625 bits/weight.

    x = d * scale_j * (q - 32) in sub-block j of 16. quantize_row_q6_K_ref.
    """

    name, block_size, type_size = "q6_K", QK_K, 210

    def quantize_blocks(self, x):
        nb = x.shape[0]
        sub = np.ascontiguousarray(x.reshape(nb * 16, 16), dtype=np.float32)
        scales = np.empty(nb * 16, np.float32)
        L = np.empty((nb * 16, 16), np.int32)
        search.q6k_subblocks(sub, scales, L)
        scales, L = scales.reshape(nb, 16), L.reshape(nb, 16, 16)
        # the scale of largest magnitude, first on ties (C: strict '>' from 0)
        idx = np.argmax(np.abs(scales), axis=1)
        max_scale = scales[np.arange(nb), idx]
        zero = np.abs(max_scale) < search.GROUP_MAX_EPS
        safe = np.where(zero, f32(1), max_scale)
        iscale = (f32(-128) / safe).astype(f32)
        d16 = np.where(zero, fp16(0), fp16(f32(1) / iscale))
        sc = np.minimum(127, nearest_int(iscale[:, None] * scales)).astype(np.int8)
        d = d16.astype(np.float32)[:, None] * sc.astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            l = nearest_int(np.where(d[:, :, None] != 0, x.reshape(nb, 16, 16) /
                                     np.where(d[:, :, None] != 0, d[:, :, None], f32(1)), f32(0)))
        L = np.where(d[:, :, None] != 0, np.clip(l, -32, 31) + 32, L).reshape(nb, 2, 4, 32).astype(np.uint8)
        lo = L & 0xF
        ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2)  # (nb, 2, 64)
        qh = (L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6)
        out = np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), sc.view(np.uint8), d16[:, None].view(np.uint8)],
                             axis=1)
        out[zero] = 0  # memset(&y[i], 0, ...): an all-zero super-block is all zero bytes
        return out

    def dequantize_blocks(self, b):
        nb = b.shape[0]
        ql, qh, sc, d = _head(b, 128, 64, 16, 2)
        ql = ql.reshape(nb, 2, 64)
        qh = qh.reshape(nb, 2, 32)
        q = np.stack([(ql[:, :, :32] & 0xF) | (((qh >> 0) & 3) << 4), (ql[:, :, 32:] & 0xF) | (((qh >> 2) & 3) << 4),
                      (ql[:, :, :32] >> 4) | (((qh >> 4) & 3) << 4), (ql[:, :, 32:] >> 4) | (((qh >> 6) & 3) << 4)],
                     axis=2)  # (nb, 2, 4, 32)
        q = q.reshape(nb, 16, 16).astype(np.int8) - np.int8(32)
        dd = (_f16(d) * sc.view(np.int8).astype(np.float32)).reshape(nb, 16, 1)
        return (dd * q.astype(np.float32)).reshape(nb, QK_K)
