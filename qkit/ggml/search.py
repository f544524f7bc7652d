"""The per-block searches of llama.cpp's k-quants (ggml-quants.c), in Numba, bit for bit.

These loops accumulate sums, so their order matters: each function walks its
block in C's order with float32 arithmetic (every literal and int is cast to
float32 before it meets a float, no fastmath, so no reassociation or fused
multiply-add: libggml-base is built for baseline x86-64, without FMA).
"""
import numpy as np
from numba import njit

f32 = np.float32
GROUP_MAX_EPS = np.float32(1e-15)
_JIT = dict(cache=True, nogil=True, fastmath=False, error_model="numpy")


@njit(**_JIT)
def nearest_int(v):
    """ggml-quants.c nearest_int: float32 + 1.5 * 2^23 rounds to an integer, ties to even."""
    return int((v + f32(12582912.0)) - f32(12582912.0))


@njit(**_JIT)
def _sum_sq(x):
    """sum x_i^2 in index order, float32 (the loops that open every k-quant block)."""
    acc = f32(0)
    for i in range(x.shape[0]):
        acc += x[i] * x[i]
    return acc


@njit(**_JIT)
def _importance(x, qw, sigma2, out):
    """The _impl quantizers' weights: out_i = qw_i * sqrt(sigma2 + x_i^2)."""
    for i in range(x.shape[0]):
        out[i] = qw[i] * np.sqrt(sigma2 + x[i] * x[i])


@njit(**_JIT)
def make_qkx2_quants(x, weights, nmax, L, Laux, rmin, rdelta, nstep, use_mad):
    """ggml-quants.c make_qkx2_quants: affine (scale, -min) search over nstep + 1 candidate scales.

    Returns (scale, the_min); L receives the codes.
    """
    n = x.shape[0]
    mn = x[0]
    mx = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        w = weights[i]
        sum_w += w
        sum_x += w * x[i]
    if mn > f32(0):
        mn = f32(0)
    if mx == mn:
        for i in range(n):
            L[i] = 0
        return f32(0), -mn
    iscale = f32(nmax) / (mx - mn)
    scale = f32(1) / iscale
    best_error = f32(0)
    for i in range(n):
        l = nearest_int(iscale * (x[i] - mn))
        L[i] = max(0, min(nmax, l))
        diff = scale * f32(L[i]) + mn - x[i]
        diff = abs(diff) if use_mad else diff * diff
        best_error += weights[i] * diff
    if nstep < 1:
        return scale, -mn
    for is_ in range(nstep + 1):
        iscale = (rmin + rdelta * f32(is_) + f32(nmax)) / (mx - mn)
        sum_l = f32(0)
        sum_l2 = f32(0)
        sum_xl = f32(0)
        for i in range(n):
            l = nearest_int(iscale * (x[i] - mn))
            l = max(0, min(nmax, l))
            Laux[i] = l
            w = weights[i]
            fl = f32(l)
            sum_l += w * fl
            sum_l2 += w * fl * fl
            sum_xl += w * fl * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > f32(0):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > f32(0):
                this_min = f32(0)
                this_scale = sum_xl / sum_l2
            cur_error = f32(0)
            for i in range(n):
                diff = this_scale * f32(Laux[i]) + this_min - x[i]
                diff = abs(diff) if use_mad else diff * diff
                cur_error += weights[i] * diff
            if cur_error < best_error:
                for i in range(n):
                    L[i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                mn = this_min
    return scale, -mn


@njit(**_JIT)
def _qx_weight(xi, rmse_type):
    if rmse_type == 1:
        return xi * xi
    if rmse_type == 2:
        return f32(1)
    if rmse_type == 3:
        return abs(xi)
    return np.sqrt(abs(xi))


@njit(**_JIT)
def make_qx_quants(x, nmax, L, rmse_type, qw, use_qw, wbuf):
    """ggml-quants.c make_qx_quants: symmetric scale search (19 candidates); returns the scale, L the codes.

    wbuf: scratch of at least len(x) floats for the per-element weights, computed once (C recomputes
    them inside each loop; the values, and so the bytes, are the same).
    """
    n = x.shape[0]
    mx = f32(0)
    amax = f32(0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return f32(0)
    iscale = f32(-nmax) / mx
    if rmse_type == 0:
        for i in range(n):
            l = nearest_int(iscale * x[i])
            L[i] = nmax + max(-nmax, min(nmax - 1, l))
        return f32(1) / iscale
    return_early = False
    if rmse_type < 0:
        rmse_type = -rmse_type
        return_early = True
    for i in range(n):
        wbuf[i] = qw[i] if use_qw else _qx_weight(x[i], rmse_type)
    sumlx = f32(0)
    suml2 = f32(0)
    for i in range(n):
        l = nearest_int(iscale * x[i])
        l = max(-nmax, min(nmax - 1, l))
        L[i] = l + nmax
        w = wbuf[i]
        fl = f32(l)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    scale = sumlx / suml2 if suml2 != f32(0) else f32(0)
    if return_early:
        return f32(0.5) * (scale + f32(1) / iscale) if suml2 > f32(0) else f32(1) / iscale
    best = scale * sumlx
    for is_ in range(-9, 10):
        if is_ == 0:
            continue
        iscale = -(f32(nmax) + f32(0.1) * f32(is_)) / mx
        sumlx = f32(0)
        suml2 = f32(0)
        for i in range(n):
            l = nearest_int(iscale * x[i])
            l = max(-nmax, min(nmax - 1, l))
            w = wbuf[i]
            fl = f32(l)
            sumlx += w * x[i] * fl
            suml2 += w * fl * fl
        if suml2 > f32(0) and sumlx * sumlx > best * suml2:
            for i in range(n):
                l = nearest_int(iscale * x[i])
                L[i] = nmax + max(-nmax, min(nmax - 1, l))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(**_JIT)
def qkx2_subblocks(x, nmax, rmin, rdelta, nstep, scales, mins, L):
    """quantize_row_q4_K_ref / q5_K_ref's first pass: per 32-weight sub-block, weights av_x + |x| and
    make_qkx2_quants(32, nmax, ..., rmin, rdelta, nstep) (q4_K: 15, -1, 0.1, 20; q5_K: 31, -0.5, 0.1, 15).

    x: (n_sub, 32) float32; fills scales, mins (n_sub,) and L (n_sub, 32).
    """
    weights = np.empty(32, dtype=np.float32)
    Laux = np.empty(32, dtype=np.int32)
    Lrow = np.empty(32, dtype=np.int32)
    for j in range(x.shape[0]):
        xs = x[j]
        av_x = np.sqrt(_sum_sq(xs) / f32(32))
        for l in range(32):
            weights[l] = av_x + abs(xs[l])
        s, m = make_qkx2_quants(xs, weights, nmax, Lrow, Laux, rmin, rdelta, nstep, False)
        scales[j] = s
        mins[j] = m
        for l in range(32):
            L[j, l] = Lrow[l]


@njit(**_JIT)
def q6k_subblocks(x, scales, L):
    """quantize_row_q6_K_ref's first pass: make_qx_quants(16, 32, x, L, rmse_type 1) per 16 weights."""
    Lrow = np.empty(16, dtype=np.int32)
    dummy = np.empty(1, dtype=np.float32)
    wbuf = np.empty(16, dtype=np.float32)
    for j in range(x.shape[0]):
        scales[j] = make_qx_quants(x[j], 32, Lrow, 1, dummy, False, wbuf)
        for l in range(16):
            L[j, l] = Lrow[l]


@njit(**_JIT)
def q2k_subblocks(x, scales, mins, L):
    """quantize_row_q2_K_ref's first pass: weights |x|, make_qkx2_quants(16, 3, ..., -0.5, 0.1, 15, use_mad)."""
    weights = np.empty(16, dtype=np.float32)
    Laux = np.empty(16, dtype=np.int32)
    Lrow = np.empty(16, dtype=np.int32)
    for j in range(x.shape[0]):
        xs = x[j]
        for l in range(16):
            weights[l] = abs(xs[l])
        s, m = make_qkx2_quants(xs, weights, 3, Lrow, Laux, f32(-0.5), f32(0.1), 15, True)
        scales[j] = s
        mins[j] = m
        for l in range(16):
            L[j, l] = Lrow[l]


@njit(**_JIT)
def make_q3_quants(x, nmax, L, do_rmse):
    """ggml-quants.c make_q3_quants: symmetric codes, then up to 5 rounds of coordinate descent on
    the weighted (w = x^2) fit; returns the scale, L the codes (offset by nmax)."""
    n = x.shape[0]
    mx = f32(0)
    amax = f32(0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return f32(0)
    iscale = f32(-nmax) / mx
    if do_rmse:
        sumlx = f32(0)
        suml2 = f32(0)
        for i in range(n):
            l = nearest_int(iscale * x[i])
            l = max(-nmax, min(nmax - 1, l))
            L[i] = l
            w = x[i] * x[i]
            fl = f32(l)
            sumlx += w * x[i] * fl
            suml2 += w * fl * fl
        for itry in range(5):
            n_changed = 0
            for i in range(n):
                w = x[i] * x[i]
                fL = f32(L[i])
                slx = sumlx - w * x[i] * fL
                if slx > f32(0):
                    sl2 = suml2 - w * fL * fL
                    new_l = nearest_int(x[i] * sl2 / slx)
                    new_l = max(-nmax, min(nmax - 1, new_l))
                    if new_l != L[i]:
                        fn = f32(new_l)
                        slx += w * x[i] * fn
                        sl2 += w * fn * fn
                        if sl2 > f32(0) and slx * slx * suml2 > sumlx * sumlx * sl2:
                            L[i] = new_l
                            sumlx = slx
                            suml2 = sl2
                            n_changed += 1
            if n_changed == 0:
                break
        for i in range(n):
            L[i] += nmax
        return sumlx / suml2 if suml2 > f32(0) else f32(0)
    for i in range(n):
        l = nearest_int(iscale * x[i])
        l = max(-nmax, min(nmax - 1, l))
        L[i] = l + nmax
    return f32(1) / iscale


@njit(**_JIT)
def q3k_subblocks(x, scales, L):
    """quantize_row_q3_K_ref's first pass: make_q3_quants(16, 4, x, L, true) per 16 weights."""
    Lrow = np.empty(16, dtype=np.int32)
    for j in range(x.shape[0]):
        scales[j] = make_q3_quants(x[j], 4, Lrow, True)
        for l in range(16):
            L[j, l] = Lrow[l]


@njit(**_JIT)
def make_qkx3_quants(x, weights, nmax, L, Laux, rmin, rdelta, nstep, use_mad):
    """ggml-quants.c make_qkx3_quants (weights given): make_qkx2_quants' search with a `max <= min` exit."""
    n = x.shape[0]
    mn = x[0]
    mx = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        w = weights[i]
        sum_w += w
        sum_x += w * x[i]
    if mn > f32(0):
        mn = f32(0)
    if mx <= mn:
        for i in range(n):
            L[i] = 0
        return f32(0), -mn
    return make_qkx2_quants(x, weights, nmax, L, Laux, rmin, rdelta, nstep, use_mad)


@njit(**_JIT)
def make_qp_quants(x, nmax, L, qw):
    """ggml-quants.c make_qp_quants: non-negative codes 0..nmax for the sub-block scales (or mins),
    a 9-point search of the super-scale, then coordinate descent; returns the super-scale."""
    n = x.shape[0]
    mx = f32(0)
    for i in range(n):
        mx = max(mx, x[i])
    if mx < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return f32(0)
    iscale = f32(nmax) / mx
    for i in range(n):
        L[i] = nearest_int(iscale * x[i]) & 0xFF  # stored in a uint8_t
    scale = f32(1) / iscale
    best_mse = f32(0)
    for i in range(n):
        diff = x[i] - scale * f32(L[i])
        best_mse += qw[i] * diff * diff
    for is_ in range(-4, 5):
        if is_ == 0:
            continue
        iscale_is = (f32(0.1) * f32(is_) + f32(nmax)) / mx
        scale_is = f32(1) / iscale_is
        mse = f32(0)
        for i in range(n):
            l = min(nmax, nearest_int(iscale_is * x[i]))
            diff = x[i] - scale_is * f32(l)
            mse += qw[i] * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = f32(0)
    suml2 = f32(0)
    for i in range(n):
        l = min(nmax, nearest_int(iscale * x[i]))
        L[i] = l & 0xFF
        w = qw[i]
        fl = f32(L[i])
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    for itry in range(5):
        n_changed = 0
        for i in range(n):
            w = qw[i]
            fL = f32(L[i])
            slx = sumlx - w * x[i] * fL
            sl2 = suml2 - w * fL * fL
            if slx > f32(0) and sl2 > f32(0):
                new_l = min(nmax, nearest_int(x[i] * sl2 / slx))
                if new_l != L[i]:
                    fn = f32(new_l)
                    slx += w * x[i] * fn
                    sl2 += w * fn * fn
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return sumlx / suml2 if suml2 > f32(0) else f32(0)


@njit(**_JIT)
def qkx3_superblocks(x, qw, nmax, rmin, rdelta, nstep, Ls, Lm, d_block, m_block, L):
    """quantize_row_q4_K_impl / q5_K_impl with an importance matrix, up to the packed scales:
    weights qw * sqrt(sigma2 + x^2), make_qkx3_quants per 32, make_qp_quants for scales and mins.

    x, qw: (nb, 256); Ls, Lm: (nb, 8); d_block, m_block: (nb,); L: (nb, 256).
    """
    weights = np.empty(32, dtype=np.float32)
    Laux = np.empty(32, dtype=np.int32)
    Lrow = np.empty(32, dtype=np.int32)
    sw = np.empty(8, dtype=np.float32)
    scales = np.empty(8, dtype=np.float32)
    mins = np.empty(8, dtype=np.float32)
    Lq = np.empty(8, dtype=np.int32)
    for b in range(x.shape[0]):
        xb = x[b]
        sigma2 = f32(2) * _sum_sq(xb) / f32(256)
        for j in range(8):
            _importance(xb[32 * j:32 * j + 32], qw[b, 32 * j:32 * j + 32], sigma2, weights)
            sumw = f32(0)
            for l in range(32):
                sumw += weights[l]
            sw[j] = sumw
            s, m = make_qkx3_quants(xb[32 * j:32 * j + 32], weights, nmax, Lrow, Laux, rmin, rdelta, nstep, False)
            scales[j] = s
            mins[j] = m
            for l in range(32):
                L[b, 32 * j + l] = Lrow[l]
        d_block[b] = make_qp_quants(scales, 63, Lq, sw)
        for j in range(8):
            Ls[b, j] = Lq[j]
        m_block[b] = make_qp_quants(mins, 63, Lq, sw)
        for j in range(8):
            Lm[b, j] = Lq[j]


@njit(**_JIT)
def q6k_subblocks_qw(x, qw, scales, L):
    """quantize_row_q6_K_impl's first pass: make_qx_quants(16, 32, x, L, 1, qw) per 16 weights."""
    Lrow = np.empty(16, dtype=np.int32)
    wbuf = np.empty(16, dtype=np.float32)
    for j in range(x.shape[0]):
        scales[j] = make_qx_quants(x[j], 32, Lrow, 1, qw[j], True, wbuf)
        for l in range(16):
            L[j, l] = Lrow[l]


@njit(**_JIT)
def q2k_impl_blocks(x, qw, Ls, Lm, dm, mm, L):
    """quantize_row_q2_K_impl's first pass: weights qw * sqrt(sigma2 + x^2) (sigma2 = mean x^2 of the
    super-block), make_qkx3_quants(16, 3, ..., -0.9, 0.05, 36) per 16, make_qp_quants(16, 15) for scales
    and mins with the sub-blocks' weight sums."""
    weight = np.empty(16, dtype=np.float32)
    Laux = np.empty(16, dtype=np.int32)
    Lrow = np.empty(16, dtype=np.int32)
    sw = np.empty(16, dtype=np.float32)
    scales = np.empty(16, dtype=np.float32)
    mins = np.empty(16, dtype=np.float32)
    Lq = np.empty(16, dtype=np.int32)
    for b in range(x.shape[0]):
        xb = x[b]
        sigma2 = _sum_sq(xb) / f32(256)
        for j in range(16):
            sw[j] = f32(0)
            _importance(xb[16 * j:16 * j + 16], qw[b, 16 * j:16 * j + 16], sigma2, weight)
            for l in range(16):
                sw[j] += weight[l]
            s, m = make_qkx3_quants(xb[16 * j:16 * j + 16], weight, 3, Lrow, Laux, f32(-0.9), f32(0.05), 36, False)
            scales[j] = s
            mins[j] = m
            for l in range(16):
                L[b, 16 * j + l] = Lrow[l]
        dm[b] = make_qp_quants(scales, 15, Lq, sw)
        for j in range(16):
            Ls[b, j] = Lq[j]
        mm[b] = make_qp_quants(mins, 15, Lq, sw)
        for j in range(16):
            Lm[b, j] = Lq[j]


@njit(**_JIT)
def q3k_impl_blocks(x, qw, Ls, d_block, L):
    """quantize_row_q3_K_impl's first pass: weights qw * sqrt(2 mean x^2 + x^2), make_qx_quants(16, 4)
    per 16, then make_qx_quants(16, 32) over the 16 scales weighted by the sub-blocks' weight sums."""
    weight = np.empty(16, dtype=np.float32)
    Lrow = np.empty(16, dtype=np.int32)
    sw = np.empty(16, dtype=np.float32)
    scales = np.empty(16, dtype=np.float32)
    Lq = np.empty(16, dtype=np.int32)
    wbuf = np.empty(16, dtype=np.float32)
    for b in range(x.shape[0]):
        xb = x[b]
        sigma2 = f32(2) * _sum_sq(xb) / f32(256)
        for j in range(16):
            _importance(xb[16 * j:16 * j + 16], qw[b, 16 * j:16 * j + 16], sigma2, weight)
            sumw = f32(0)
            for l in range(16):
                sumw += weight[l]
            sw[j] = sumw
            scales[j] = make_qx_quants(xb[16 * j:16 * j + 16], 4, Lrow, 1, weight, True, wbuf)
            for l in range(16):
                L[b, 16 * j + l] = Lrow[l]
        d_block[b] = make_qx_quants(scales, 32, Lq, 1, sw, True, wbuf)
        for j in range(16):
            Ls[b, j] = Lq[j]


@njit(**_JIT)
def rows_qx_imatrix(x, qw, nmax, d, L):
    """quantize_row_q4_0_impl / q5_0_impl: per row sigma2 = mean x^2, per 32 weights
    make_qx_quants(32, nmax, xb, L, 1, qw * sqrt(sigma2 + x^2)). x: (rows, n); d: (rows, n / 32)."""
    n = x.shape[1]
    weight = np.empty(32, dtype=np.float32)
    Lrow = np.empty(32, dtype=np.int32)
    wbuf = np.empty(32, dtype=np.float32)
    for r in range(x.shape[0]):
        sigma2 = _sum_sq(x[r]) / f32(n)
        for ib in range(n // 32):
            _importance(x[r, 32 * ib:32 * ib + 32], qw[32 * ib:32 * ib + 32], sigma2, weight)
            d[r, ib] = make_qx_quants(x[r, 32 * ib:32 * ib + 32], nmax, Lrow, 1, weight, True, wbuf)
            for j in range(32):
                L[r, 32 * ib + j] = Lrow[j]


@njit(**_JIT)
def rows_qkx3_imatrix(x, qw, nmax, d, m, L):
    """quantize_row_q4_1_impl / q5_1_impl: per 32 weights make_qkx3_quants(32, nmax, ..., -0.9, 0.05, 36)
    with weights qw * sqrt(sigma2 + x^2); m receives -the_min (the block's stored minimum)."""
    n = x.shape[1]
    weight = np.empty(32, dtype=np.float32)
    Laux = np.empty(32, dtype=np.int32)
    Lrow = np.empty(32, dtype=np.int32)
    for r in range(x.shape[0]):
        sigma2 = _sum_sq(x[r]) / f32(n)
        for ib in range(n // 32):
            _importance(x[r, 32 * ib:32 * ib + 32], qw[32 * ib:32 * ib + 32], sigma2, weight)
            s, mn = make_qkx3_quants(x[r, 32 * ib:32 * ib + 32], weight, nmax, Lrow, Laux, f32(-0.9), f32(0.05),
                                     36, False)
            d[r, ib] = s
            m[r, ib] = -mn
            for j in range(32):
                L[r, 32 * ib + j] = Lrow[j]
