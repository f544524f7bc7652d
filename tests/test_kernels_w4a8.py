"""W4A8 kernels (GPTQ-packed int4 weights x int8 activations): exact block sums on every backend and ISA, the GEMV
against the numpy reference and against the float64 formula on the dequantized weights, q8 activations equal to
llama.cpp's q8_0 codes."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkit import ext, ggml
from qkit import packing as P
from qkit.errors import InputError
from qkit.ext import reference as R

from backends import W4A8_BACKENDS as BACKENDS  # noqa: E402
from backends import W4A8_IDS as IDS  # noqa: E402

SHAPES = [(8, 1), (32, 8), (40, 7), (128, 9), (136, 16), (576, 64)]


def packed(codes):
    """GPTQ's qweight of codes (in, out), by qkit.packing (the exporter's packer, written apart from the kernels)."""
    return np.ascontiguousarray(P.pack_gptq_qweight(codes.astype(np.uint8), bits=4))


@pytest.mark.parametrize("backend,isa", BACKENDS, ids=IDS)
@pytest.mark.parametrize("n_in,n_out", SHAPES)
def test_block_sums_are_exact(backend, isa, n_in, n_out):
    rng = np.random.default_rng(n_in * 100 + n_out)
    cases = [(rng.integers(0, 16, (n_in, n_out)), rng.integers(-127, 128, n_in).astype(np.int8))]
    cases += [(np.full((n_in, n_out), c), np.full(n_in, x, np.int8)) for c in (0, 15) for x in (-127, 127, 0)]
    for codes, xq in cases:
        qw = packed(codes)
        got = ext.w4a8_blocks(xq, qw, backend=backend, isa=isa)
        nb = -(-n_in // 32)
        want = np.array([[int(np.dot(codes[32 * b: 32 * b + 32, o].astype(np.int64),
                                     xq[32 * b: 32 * b + 32].astype(np.int64))) for o in range(n_out)]
                         for b in range(nb)], np.int64)
        assert got.dtype == np.int32 and np.array_equal(got, want)


def affine_case(rng, n_in, n_out, g):
    ng = -(-n_in // g)
    codes = rng.integers(0, 16, (n_in, n_out))
    zeros = rng.integers(0, 16, (ng, n_out)).astype(np.uint8)
    scales = (rng.random((ng, n_out)) * 0.02 + 1e-3).astype(np.float16).astype(np.float32)  # fp16 values
    x = rng.standard_normal(n_in).astype(np.float32)
    return codes, zeros, scales, x


@pytest.mark.parametrize("backend,isa", BACKENDS, ids=IDS)
@pytest.mark.parametrize("n_in,n_out,g", [(128, 9, 32), (136, 16, 64), (576, 64, 128), (40, 7, None), (200, 8, 96)])
def test_gemv_matches_the_reference_and_the_dequantized_formula(backend, isa, n_in, n_out, g):
    rng = np.random.default_rng(n_in + n_out)
    gg = n_in if g is None else g
    codes, zeros, scales, x = affine_case(rng, n_in, n_out, gg)
    xq, xs = ext.quantize_q8(x)
    qw = packed(codes)
    y = ext.gemv_w4a8(xq, xs, qw, zeros, scales, g, backend=backend, isa=isa)
    ref = R.gemv_w4a8(xq, xs, qw, zeros, scales, gg)
    assert y.dtype == np.float32 and np.allclose(y, ref, rtol=1e-5, atol=1e-6)
    # the paper-level formula in float64: W = scale * (q - zero) (GPTQ's dequantization), times the dequantized x
    gi = np.arange(n_in) // gg
    W = scales[gi].astype(np.float64) * (codes - zeros[gi].astype(np.float64))  # (in, out)
    xd = xq.astype(np.float64) * np.repeat(xs.astype(np.float64), 32)[:n_in]
    assert np.allclose(y, xd @ W, rtol=1e-4, atol=1e-5 * np.abs(W).sum(0).max())


def test_q8_codes_are_llamacpp_q8_0_codes():
    """qs of every block equal the q8_0 blocks qkit.ggml writes (byte-identical to libggml: test_ggml's digests);
    the scale is kept in float32 (q8_0 rounds it to fp16)."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(32 * 40) * np.repeat(rng.random(40) * 5, 32)).astype(np.float32)
    x[:32] = 0  # an all-zero block: scale 0, codes 0
    xq, xs = ext.quantize_q8(x)
    blocks = ggml.quantize(x.reshape(1, -1), "q8_0").reshape(-1, 34)  # fp16 d, then 32 int8
    assert np.array_equal(xq.reshape(-1, 32), blocks[:, 2:].view(np.int8))
    assert np.array_equal(xs.astype(np.float16), blocks[:, :2].copy().view(np.float16).reshape(-1))
    assert xs[0] == 0 and not xq[:32].any()


@settings(max_examples=40, deadline=None)
@given(n8=st.integers(1, 40), n_out=st.integers(1, 20), seed=st.integers(0, 2**32 - 1))
def test_block_sums_property_all_backends(n8, n_out, seed):
    rng = np.random.default_rng(seed)
    n_in = 8 * n8
    codes = rng.integers(0, 16, (n_in, n_out))
    xq = rng.integers(-127, 128, n_in).astype(np.int8)
    qw = packed(codes)
    want = R.w4a8_blocks(xq, qw)
    for backend, isa in BACKENDS:
        assert np.array_equal(ext.w4a8_blocks(xq, qw, backend=backend, isa=isa), want), (backend, isa)


def test_bad_input_is_one_clear_error():
    rng = np.random.default_rng(1)
    codes, zeros, scales, x = affine_case(rng, 128, 8, 32)
    xq, xs = ext.quantize_q8(x)
    qw = packed(codes)
    with pytest.raises(InputError, match="holds 128 inputs"):
        ext.gemv_w4a8(xq[:64], xs, qw, zeros, scales, 32)
    with pytest.raises(InputError, match="multiple of 32"):
        ext.gemv_w4a8(xq, xs, qw, np.zeros((3, 8), np.uint8), np.ones((3, 8), np.float32), 48)
    with pytest.raises(InputError, match=r"must be \(4, 8\)"):
        ext.gemv_w4a8(xq, xs, qw, zeros[:2], scales, 32)
    with pytest.raises(InputError, match="0..15"):
        ext.gemv_w4a8(xq, xs, qw, zeros + 16, scales, 32)
    with pytest.raises(InputError, match="NaN or Inf"):
        ext.quantize_q8(np.array([1.0, np.nan], np.float32))
    with pytest.raises(InputError, match="dtype int32"):
        ext.gemv_w4a8(xq, xs, qw.astype(np.int64), zeros, scales, 32)


@pytest.mark.parametrize("isa", [i for b, i in BACKENDS if b == "native"])
@pytest.mark.parametrize("n_out", [1, 15, 16, 17, 40, 200])
def test_threads_split_outputs_without_changing_a_bit(isa, n_out):
    rng = np.random.default_rng(n_out)
    codes, zeros, scales, x = affine_case(rng, 256, n_out, 64)
    xq, xs = ext.quantize_q8(x)
    qw = packed(codes)
    one = ext.gemv_w4a8(xq, xs, qw, zeros, scales, 64, backend="native", isa=isa)
    for t in (2, 3, 7, 64):
        assert np.array_equal(ext.gemv_w4a8(xq, xs, qw, zeros, scales, 64, threads=t, backend="native", isa=isa),
                              one), t
    with pytest.raises(InputError, match="threads"):
        ext.gemv_w4a8(xq, xs, qw, zeros, scales, 64, threads=0, backend="native", isa=isa)


@pytest.mark.parametrize("backend", sorted({b for b, _ in BACKENDS}))
def test_q8_rounding_at_the_half_boundaries(backend):
    """Values whose scaled form sits at or next to a .5 boundary (0.49999997 must round down, 0.5 away from zero):
    the same codes as qkit.ggml's q8_0 (llama.cpp's roundf) on every backend."""
    half = np.float32(0.5)
    v = np.array([np.nextafter(half, np.float32(0)), half, np.nextafter(half, np.float32(1)), 1.5, 2.5, -0.5,
                  -np.nextafter(half, np.float32(0)), -2.5, 126.5], np.float32)
    x = np.concatenate([v, np.full(32 - len(v), 0.0, np.float32)])
    x[-1] = 127.0  # d = 1 for the block, so x * (1 / d) = x
    xq, xs = ext.quantize_q8(x, backend=backend)
    blocks = ggml.quantize(x.reshape(1, -1), "q8_0").reshape(-1, 34)
    assert xs[0] == 1.0 and np.array_equal(xq, blocks[0, 2:].view(np.int8))
    assert list(xq[:9]) == [0, 1, 1, 2, 3, -1, 0, -3, 127]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), seed=st.integers(0, 2**32 - 1), scale=st.floats(1e-6, 1e6))
def test_q8_codes_equal_across_backends(n, seed, scale):
    x = (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)
    want = R.quantize_q8(x)
    for backend in sorted({b for b, _ in BACKENDS}):
        xq, xs = ext.quantize_q8(x, backend=backend)
        assert np.array_equal(xq, want[0]) and np.array_equal(xs, want[1]), backend


# ------------------------------------------------------------------ prefill: many tokens per call
@pytest.mark.parametrize("backend,isa", BACKENDS, ids=IDS)
@pytest.mark.parametrize("m,n_in,n_out,g", [(1, 128, 16, 32), (3, 136, 17, 64), (4, 576, 40, 128), (9, 200, 8, 96),
                                            (13, 40, 33, None)])
def test_gemm_is_the_gemv_of_every_row_bit_for_bit(backend, isa, m, n_in, n_out, g):
    """Token tiles of 4 with 1..3 left over, 16- and 8-output lines with scalar tails: every row equals the GEMV of
    that row on the same path exactly (the same integers in the same float order)."""
    rng = np.random.default_rng(m * n_in + n_out)
    gg = n_in if g is None else g
    codes, zeros, scales, _ = affine_case(rng, n_in, n_out, gg)
    X = (rng.standard_normal((m, n_in)) * rng.random((m, 1)) * 4).astype(np.float32)
    xq, xs = ext.quantize_q8(X, backend=backend)
    qw = packed(codes)
    Y = ext.gemm_w4a8(xq, xs, qw, zeros, scales, g, backend=backend, isa=isa, threads=2)
    assert Y.shape == (m, n_out) and Y.dtype == np.float32
    for t in range(m):
        q1, s1 = ext.quantize_q8(X[t], backend=backend)
        assert np.array_equal(q1, xq[t]) and np.array_equal(s1, xs[t])
        assert np.array_equal(Y[t], ext.gemv_w4a8(q1, s1, qw, zeros, scales, g, backend=backend, isa=isa)), t
    ref = np.stack([R.gemv_w4a8(xq[t], xs[t], qw, zeros, scales, gg) for t in range(m)])
    assert np.allclose(Y, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("isa", [i for b, i in BACKENDS if b == "native"])
def test_gemm_threads_do_not_change_a_bit(isa):
    rng = np.random.default_rng(5)
    codes, zeros, scales, _ = affine_case(rng, 256, 200, 64)
    xq, xs = ext.quantize_q8(rng.standard_normal((6, 256)).astype(np.float32))
    qw = packed(codes)
    one = ext.gemm_w4a8(xq, xs, qw, zeros, scales, 64, backend="native", isa=isa)
    for t in (2, 3, 5, 13, 64):
        assert np.array_equal(ext.gemm_w4a8(xq, xs, qw, zeros, scales, 64, threads=t, backend="native", isa=isa), one)


def test_gemm_bad_input_is_one_clear_error():
    rng = np.random.default_rng(1)
    codes, zeros, scales, _ = affine_case(rng, 64, 16, 32)
    qw = packed(codes)
    xq, xs = ext.quantize_q8(rng.standard_normal((2, 64)).astype(np.float32))
    with pytest.raises(InputError, match="rows"):
        ext.gemm_w4a8(xq[:, :32].copy(), xs, qw, zeros, scales, 32)
    with pytest.raises(InputError, match="block scales"):
        ext.gemm_w4a8(xq, xs[:1].copy(), qw, zeros, scales, 32)
    with pytest.raises(InputError, match="2-D"):
        ext.gemm_w4a8(xq[0], xs, qw, zeros, scales, 32)
    with pytest.raises(InputError, match="NaN"):
        ext.quantize_q8(np.full((2, 8), np.nan, np.float32))


# ------------------------------------------------------------------ W8A8: GPTQ's 8-bit layout, the same sums
def packed8(codes):
    return np.ascontiguousarray(P.pack_gptq_qweight(np.ascontiguousarray(codes).astype(np.int32), 8))


@pytest.mark.parametrize("backend,isa", BACKENDS, ids=IDS)
@pytest.mark.parametrize("m,n_in,n_out,g", [(1, 128, 16, 32), (3, 132, 17, None), (5, 576, 40, 128),
                                            (2, 200, 8, 96), (7, 64, 49, None)])
def test_w8a8_matches_the_dequantized_formula_and_each_row(backend, isa, m, n_in, n_out, g):
    rng = np.random.default_rng(m + n_in + n_out)
    gg = n_in if g is None else g
    ng = -(-n_in // gg)
    codes = rng.integers(0, 256, (n_in, n_out))
    codes[:, 0] = 255  # the largest products: 255 * 127 would saturate a plain maddubs
    zeros = rng.integers(0, 256, (ng, n_out)).astype(np.uint8)
    scales = (rng.random((ng, n_out)) * 0.01 + 1e-4).astype(np.float32)
    X = rng.standard_normal((m, n_in)).astype(np.float32)
    X[0, :32] = 3.0  # a block of all +127 codes
    xq, xs = ext.quantize_q8(X)
    qw = packed8(codes)
    assert np.array_equal(R.unpack_gptq_int8(qw), codes)
    Y = ext.gemm_w8a8(xq, xs, qw, zeros, scales, g, backend=backend, isa=isa, threads=2)
    ref = np.stack([R.gemv_w4a8(xq[t], xs[t], qw, zeros, scales, gg, bits=8) for t in range(m)])
    assert Y.shape == (m, n_out) and np.allclose(Y, ref, rtol=1e-5, atol=1e-6)
    for t in range(m):
        assert np.array_equal(Y[t], ext.gemv_w8a8(xq[t], xs[t], qw, zeros, scales, g, backend=backend, isa=isa))
    gi = np.arange(n_in) // gg
    W = scales[gi].astype(np.float64) * (codes - zeros[gi].astype(np.float64))
    xd = xq.astype(np.float64) * np.repeat(xs.astype(np.float64), 32, axis=1)[:, :n_in]
    assert np.allclose(Y, xd @ W, rtol=1e-4, atol=1e-5 * np.abs(W).sum(0).max())
    if backend == "native":  # the integer block sums, exactly, on the scalar path
        acc = R.w4a8_blocks(xq[0], qw, bits=8)
        assert acc[0, 0] == 255 * 127 * 32


def test_w8a8_rejects_zeros_beyond_the_grid_and_odd_inputs():
    rng = np.random.default_rng(2)
    qw = packed8(rng.integers(0, 256, (64, 16)))
    xq, xs = ext.quantize_q8(rng.standard_normal((1, 64)).astype(np.float32))
    z4 = np.full((1, 16), 16, np.uint8)
    sc = np.ones((1, 16), np.float32)
    ext.gemm_w8a8(xq, xs, qw, z4, sc, None)  # 16 is a fine 8-bit zero
    with pytest.raises(InputError, match="0..15"):
        ext.gemm_w4a8(np.zeros((1, 128), np.int8), np.zeros((1, 4), np.float32), qw, z4, sc, None)
    with pytest.raises(InputError, match="inputs"):
        ext.gemm_w8a8(xq[:, :60].copy(), xs, qw, z4, sc, None)
