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


def quantize_scale_min(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, qw=None):
    """The shared body of quantize_row_q4_K_ref and quantize_row_q5_K_ref (and their _impl twins).

    Per 32-weight sub-block an affine (scale, min) search, then the 8 scales and 8 mins
    quantized to 6 bits against the super-block's largest (d, dmin in fp16), then every
    weight re-coded against its quantized scale and min. Returns (d16, dmin16, packed scales, L (nb, 8, 32)).
    With an importance matrix `qw` (nb, 256), the first pass is quantize_row_q4_K_impl's:
    make_qkx3_quants (rmin -0.9, rdelta 0.05, 36 steps) and make_qp_quants for the scales.
    """
    nb = x.shape[0]
    if qw is not None:
        Ls = np.empty((nb, 8), np.int32)
        Lm = np.empty((nb, 8), np.int32)
        dblk = np.empty(nb, np.float32)
        mblk = np.empty(nb, np.float32)
        L = np.empty((nb, 256), np.int32)
        search.qkx3_superblocks(np.ascontiguousarray(x, np.float32), np.ascontiguousarray(qw, np.float32), nmax,
                                f32(-0.9), f32(0.05), 36, Ls, Lm, dblk, mblk, L)
        return _recode(x, fp16(dblk), fp16(mblk), pack_scale_min_k4(Ls, Lm), L.reshape(nb, 8, 32), nmax)
    sub = np.ascontiguousarray(x.reshape(nb * 8, 32), dtype=np.float32)
    scales = np.empty(nb * 8, np.float32)
    mins = np.empty(nb * 8, np.float32)
    L = np.empty((nb * 8, 32), np.int32)
    search.qkx2_subblocks(sub, nmax, f32(rmin), f32(rdelta), nstep, scales, mins, L)
    scales, mins, L = scales.reshape(nb, 8), mins.reshape(nb, 8), L.reshape(nb, 8, 32)
    max_scale = np.maximum(scales.max(axis=1), f32(0))  # C scans from 0 with a strict '>'
    max_min = np.maximum(mins.max(axis=1), f32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, f32(63) / np.where(max_scale > 0, max_scale, f32(1)), f32(0))
        inv_min = np.where(max_min > 0, f32(63) / np.where(max_min > 0, max_min, f32(1)), f32(0))
    ls = np.minimum(63, nearest_int(inv_scale.astype(f32)[:, None] * scales).astype(np.uint8))
    lm = np.minimum(63, nearest_int(inv_min.astype(f32)[:, None] * mins).astype(np.uint8))
    return _recode(x, fp16(max_scale / f32(63)), fp16(max_min / f32(63)), pack_scale_min_k4(ls, lm), L, nmax)


def _recode(x, d16, dmin16, packed, L, nmax):
    """Every weight re-coded against its sub-block's quantized scale and min (both paths' second half)."""
    nb = x.shape[0]
    sc, m = unpack_scale_min_k4(packed)
    d = d16.astype(np.float32)[:, None] * sc.astype(np.float32)  # (nb, 8)
    dm = dmin16.astype(np.float32)[:, None] * m.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        l = nearest_int(np.where(d[:, :, None] != 0, (x.reshape(nb, 8, 32) + dm[:, :, None]) /
                                 np.where(d[:, :, None] != 0, d[:, :, None], f32(1)), f32(0)))
    # `if (!d) continue;`: such a sub-block keeps the codes of the first pass
    L = np.where(d[:, :, None] != 0, np.clip(l, 0, nmax), L).astype(np.uint8)
    return d16, dmin16, packed, L


def dequantize_scale_min(d16, dmin16, scales, q):
    """x = d * sc_j * q - dmin * m_j for q (nb, 8, 32)."""
    nb = q.shape[0]
    sc, m = unpack_scale_min_k4(scales)
    d = (_f16(d16) * sc.astype(np.float32)).reshape(nb, 8, 1)
    dm = (_f16(dmin16) * m.astype(np.float32)).reshape(nb, 8, 1)
    return (d * q.astype(np.float32) - dm).reshape(nb, QK_K)


class Q4_K(BlockType):
    """block_q4_K: d, dmin (fp16), scales[12] (8 x 6-bit scale and min), qs[128]; 4.5 bits per weight.

    x = d * sc_j * q - dmin * m_j in sub-block j of 32. quantize_row_q4_K_ref.
    qs: in each 64-weight chunk c, byte l = weight 64c + l (low nibble) | weight 64c + 32 + l (high nibble).
    """

    name, block_size, type_size = "q4_K", QK_K, 144
    fp16_offsets = (0, 2)
    imatrix = True

    def quantize_blocks(self, x, qw=None):
        nb = x.shape[0]
        d16, dmin16, packed, L = quantize_scale_min(x, 15, -1.0, 0.1, 20, qw)
        L = L.reshape(nb, 4, 2, 32)
        qs = (L[:, :, 0, :] | (L[:, :, 1, :] << 4)).reshape(nb, 128)
        return np.concatenate([d16[:, None].view(np.uint8), dmin16[:, None].view(np.uint8), packed, qs], axis=1)

    def dequantize_blocks(self, b):
        nb = b.shape[0]
        d, dmin, scales, qs = _head(b, 2, 2, 12, 128)
        q = qs.reshape(nb, 4, 1, 32)
        q = np.concatenate([q & 0xF, q >> 4], axis=2).reshape(nb, 8, 32)
        return dequantize_scale_min(d, dmin, scales, q)


class Q5_K(BlockType):
    """block_q5_K: d, dmin (fp16), scales[12], qh[32] (fifth bits), qs[128]; 5.5 bits per weight.

    As q4_K with 5-bit codes; qh bit 2c of byte l is the fifth bit of weight 64c + l, bit 2c + 1
    that of weight 64c + 32 + l. quantize_row_q5_K_ref.
    """

    name, block_size, type_size = "q5_K", QK_K, 176
    fp16_offsets = (0, 2)
    imatrix = True

    def quantize_blocks(self, x, qw=None):
        nb = x.shape[0]
        d16, dmin16, packed, L = quantize_scale_min(x, 31, -0.5, 0.1, 15, qw)
        L = L.reshape(nb, 4, 2, 32)
        qs = ((L[:, :, 0, :] & 0xF) | ((L[:, :, 1, :] & 0xF) << 4)).reshape(nb, 128)
        shifts = (2 * np.arange(4, dtype=np.uint8)).reshape(1, 4, 1, 1) + np.array([0, 1], np.uint8).reshape(1, 1, 2, 1)
        qh = ((L >> 4) << shifts).sum(axis=(1, 2), dtype=np.uint8)  # distinct bits: a sum is an or
        return np.concatenate([d16[:, None].view(np.uint8), dmin16[:, None].view(np.uint8), packed, qh, qs], axis=1)

    def dequantize_blocks(self, b):
        nb = b.shape[0]
        d, dmin, scales, qh, qs = _head(b, 2, 2, 12, 32, 128)
        q = qs.reshape(nb, 4, 1, 32)
        q = np.concatenate([q & 0xF, q >> 4], axis=2)  # (nb, 4, 2, 32)
        shifts = (2 * np.arange(4, dtype=np.uint8)).reshape(1, 4, 1, 1) + np.array([0, 1], np.uint8).reshape(1, 1, 2, 1)
        q = q | (((qh.reshape(nb, 1, 1, 32) >> shifts) & 1) << 4)
        return dequantize_scale_min(d, dmin, scales, q.reshape(nb, 8, 32))


class Q6_K(BlockType):
    """block_q6_K: ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] int8, d (fp16); 6.5625 bits/weight.

    x = d * scale_j * (q - 32) in sub-block j of 16. quantize_row_q6_K_ref.
    """

    name, block_size, type_size = "q6_K", QK_K, 210
    fp16_offsets = (208,)
    imatrix = True

    def quantize_blocks(self, x, qw=None):
        nb = x.shape[0]
        sub = np.ascontiguousarray(x.reshape(nb * 16, 16), dtype=np.float32)
        scales = np.empty(nb * 16, np.float32)
        L = np.empty((nb * 16, 16), np.int32)
        if qw is None:
            search.q6k_subblocks(sub, scales, L)
        else:  # quantize_row_q6_K_impl: the importance weights enter make_qx_quants directly
            search.q6k_subblocks_qw(sub, np.ascontiguousarray(qw.reshape(nb * 16, 16), np.float32), scales, L)
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


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """Codes 0..3 of 256 weights into 64 bytes: in each 128-weight chunk, byte l holds weights
    l, l + 32, l + 64, l + 96 at bits 0-1, 2-3, 4-5, 6-7 (q2_K and q3_K qs)."""
    L = L.reshape(L.shape[0], 2, 4, 32).astype(np.uint8)
    return (L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)).reshape(-1, 64)


def _unpack_2bit(qs: np.ndarray) -> np.ndarray:
    q = qs.reshape(qs.shape[0], 2, 1, 32)
    return ((q >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)) & 3).reshape(-1, QK_K)


class Q2_K(BlockType):
    """block_q2_K: scales[16] (4-bit scale | 4-bit min << 4), qs[64], d, dmin (fp16); 2.625 bits per weight.

    x = d * (sc_j & 15) * q - dmin * (sc_j >> 4) in sub-block j of 16. quantize_row_q2_K_ref.
    """

    name, block_size, type_size = "q2_K", QK_K, 84
    fp16_offsets = (80, 82)
    imatrix = True

    def quantize_blocks(self, x, qw=None):
        nb = x.shape[0]
        if qw is not None:  # quantize_row_q2_K_impl
            Ls = np.empty((nb, 16), np.int32)
            Lm = np.empty((nb, 16), np.int32)
            dm = np.empty(nb, np.float32)
            mm = np.empty(nb, np.float32)
            L = np.empty((nb, QK_K), np.int32)
            search.q2k_impl_blocks(np.ascontiguousarray(x, np.float32), np.ascontiguousarray(qw, np.float32),
                                   Ls, Lm, dm, mm, L)
            sc = (Ls.astype(np.uint8) | (Lm.astype(np.uint8) << 4)).astype(np.uint8)
            return self._finish(x, sc, fp16(dm), fp16(mm), L.reshape(nb, 16, 16))
        sub = np.ascontiguousarray(x.reshape(nb * 16, 16), dtype=np.float32)
        scales = np.empty(nb * 16, np.float32)
        mins = np.empty(nb * 16, np.float32)
        L = np.empty((nb * 16, 16), np.int32)
        search.q2k_subblocks(sub, scales, mins, L)
        scales, mins, L = scales.reshape(nb, 16), mins.reshape(nb, 16), L.reshape(nb, 16, 16)
        q4 = f32(15)
        max_scale = np.maximum(scales.max(axis=1), f32(0))
        max_min = np.maximum(mins.max(axis=1), f32(0))
        pos_s, pos_m = max_scale > 0, max_min > 0
        with np.errstate(divide="ignore"):
            ls = np.where(pos_s[:, None], nearest_int((q4 / np.where(pos_s, max_scale, f32(1)))[:, None] * scales), 0)
            lm = np.where(pos_m[:, None], nearest_int((q4 / np.where(pos_m, max_min, f32(1)))[:, None] * mins), 0)
        sc = (ls.astype(np.uint8) | (lm.astype(np.uint8) << 4)).astype(np.uint8)
        d16 = np.where(pos_s, fp16(max_scale / q4), fp16(0))
        dmin16 = np.where(pos_m, fp16(max_min / q4), fp16(0))
        return self._finish(x, sc, d16, dmin16, L)

    @staticmethod
    def _finish(x, sc, d16, dmin16, L):
        """Re-code every weight against its sub-block's 4-bit scale and min, then pack (both paths)."""
        nb = x.shape[0]
        d = d16.astype(np.float32)[:, None] * (sc & 0xF).astype(np.float32)
        dm = dmin16.astype(np.float32)[:, None] * (sc >> 4).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            l = nearest_int(np.where(d[:, :, None] != 0, (x.reshape(nb, 16, 16) + dm[:, :, None]) /
                                     np.where(d[:, :, None] != 0, d[:, :, None], f32(1)), f32(0)))
        L = np.where(d[:, :, None] != 0, np.clip(l, 0, 3), L)
        return np.concatenate([sc, _pack_2bit(L.reshape(nb, QK_K)), d16[:, None].view(np.uint8),
                               dmin16[:, None].view(np.uint8)], axis=1)

    def dequantize_blocks(self, b):
        nb = b.shape[0]
        sc, qs, d, dmin = _head(b, 16, 64, 2, 2)
        dl = (_f16(d) * (sc & 0xF).astype(np.float32)).reshape(nb, 16, 1)
        ml = (_f16(dmin) * (sc >> 4).astype(np.float32)).reshape(nb, 16, 1)
        q = _unpack_2bit(qs).reshape(nb, 16, 16).astype(np.float32)
        return (dl * q - ml).reshape(nb, QK_K)


class Q3_K(BlockType):
    """block_q3_K: hmask[32] (third bits), qs[64] (low 2 bits), scales[12] (16 x 6-bit), d (fp16); 3.4375 bpw.

    x = d * (s_j - 32) * (q - 4) in sub-block j of 16; weight w's third bit is bit w // 32 of hmask[w % 32].
    Scales: low nibble of s_j in byte j (j < 8) or the high nibble of byte j - 8, its top two bits in
    byte 8 + j % 4 at bits 2 * (j // 4). quantize_row_q3_K_ref.
    """

    name, block_size, type_size = "q3_K", QK_K, 110
    fp16_offsets = (108,)
    imatrix = True

    def quantize_blocks(self, x, qw=None):
        nb = x.shape[0]
        if qw is not None:  # quantize_row_q3_K_impl
            Ls = np.empty((nb, 16), np.int32)
            dblk = np.empty(nb, np.float32)
            L = np.empty((nb, QK_K), np.int32)
            search.q3k_impl_blocks(np.ascontiguousarray(x, np.float32), np.ascontiguousarray(qw, np.float32),
                                   Ls, dblk, L)
            return self._finish(x, Ls.astype(np.uint8), fp16(dblk), L.reshape(nb, 16, 16))
        sub = np.ascontiguousarray(x.reshape(nb * 16, 16), dtype=np.float32)
        scales = np.empty(nb * 16, np.float32)
        L = np.empty((nb * 16, 16), np.int32)
        search.q3k_subblocks(sub, scales, L)
        scales, L = scales.reshape(nb, 16), L.reshape(nb, 16, 16)
        idx = np.argmax(np.abs(scales), axis=1)  # first largest |scale| (C: strict '>')
        max_scale = scales[np.arange(nb), idx]
        nz = max_scale != 0
        with np.errstate(divide="ignore"):
            iscale = (f32(-32) / np.where(nz, max_scale, f32(1))).astype(f32)
        l = np.clip(nearest_int(iscale[:, None] * scales).astype(np.int8), -32, 31).astype(np.int16) + 32
        l = np.where(nz[:, None], l, 0).astype(np.uint8)  # memset(scales, 0) when max_scale == 0
        d16 = np.where(nz, fp16(f32(1) / iscale), fp16(0))
        return self._finish(x, l, d16, L)

    @staticmethod
    def _finish(x, l, d16, L):
        """Pack the 6-bit scales l (nb, 16), re-code the weights against them, pack hmask and qs (both paths)."""
        nb = x.shape[0]
        packed = np.zeros((nb, 12), np.uint8)
        packed[:, :8] = (l[:, :8] & 0xF) | ((l[:, 8:] & 0xF) << 4)
        hi = (l >> 4).reshape(nb, 4, 4)  # [j // 4, j % 4]
        packed[:, 8:] = (hi << (2 * np.arange(4, dtype=np.uint8)).reshape(1, 4, 1)).sum(axis=1, dtype=np.uint8)
        s = l.astype(np.int8) - np.int8(32)  # the scales as C reads them back from the bytes
        d = d16.astype(np.float32)[:, None] * s.astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = nearest_int(np.where(d[:, :, None] != 0, x.reshape(nb, 16, 16) /
                                     np.where(d[:, :, None] != 0, d[:, :, None], f32(1)), f32(0)))
        L = np.where(d[:, :, None] != 0, np.clip(q, -4, 3) + 4, L).reshape(nb, QK_K)
        high = (L > 3).astype(np.uint8).reshape(nb, 8, 32)  # [w // 32, w % 32]
        hmask = (high << np.arange(8, dtype=np.uint8).reshape(1, 8, 1)).sum(axis=1, dtype=np.uint8)
        L = np.where(L > 3, L - 4, L)
        return np.concatenate([hmask, _pack_2bit(L), packed, d16[:, None].view(np.uint8)], axis=1)

    def dequantize_blocks(self, b):
        nb = b.shape[0]
        hmask, qs, sc, d = _head(b, 32, 64, 12, 2)
        low = np.concatenate([sc[:, :8] & 0xF, sc[:, :8] >> 4], axis=1)  # (nb, 16)
        hi = (sc[:, 8:].reshape(nb, 1, 4) >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 4, 1)) & 3  # [j//4, j%4]
        s = (low | (hi.reshape(nb, 16) << 4)).astype(np.int8) - np.int8(32)
        dl = (_f16(d) * s.astype(np.float32)).reshape(nb, 16, 1)
        h = ((hmask.reshape(nb, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1).reshape(nb, QK_K)
        q = (_unpack_2bit(qs).astype(np.int8) - np.where(h == 1, 0, 4).astype(np.int8)).reshape(nb, 16, 16)
        return (dl * q.astype(np.float32)).reshape(nb, QK_K)
