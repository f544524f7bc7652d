"""The affine grid against a plain per-group loop translation of its formulas, plus invariants."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qkit import affine
from qkit.errors import InputError, UsageError


def reference_rtn(W, bits, g, symmetric, zero_domain="int"):
    """Row by row, group by group, in plain Python: the module docstring's formulas, nothing shared.

    Arithmetic is float32 in the library's order, so ties (x / scale exactly k + 0.5) round the same way.
    """
    f32 = np.float32
    maxq = 2**bits - 1
    rows, cols = W.shape
    g = cols if g == -1 else g
    out = np.empty(W.shape, dtype=np.float64)
    for r in range(rows):
        for c0 in range(0, cols, g):
            x = W[r, c0:c0 + g].astype(f32)
            lo, hi = min(x.min(), f32(0)), max(x.max(), f32(0))
            if symmetric:
                amax = max(-lo, hi)
                scale = f32(2) * amax / f32(maxq)
            else:
                scale = (hi - lo) / f32(maxq)
            if not scale > 0:  # all zeros, or a range that underflows float32
                scale = f32(1)
            if symmetric:
                zero = f32((maxq + 1) // 2)
            else:
                zero = -lo / scale
                if zero_domain == "int":
                    zero = f32(min(max(np.round(zero), 0), maxq))
            q = np.clip(np.round(x / scale + zero), 0, maxq)
            out[r, c0:c0 + g] = scale * (q - zero)
    return out


finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)
matrices = hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, max_side=40), elements=finite)


@settings(max_examples=150, deadline=None)
@given(W=matrices, bits=st.integers(2, 8), g=st.sampled_from([1, 3, 8, 32, 128, -1]), sym=st.booleans())
def test_rtn_matches_loop_reference(W, bits, g, sym):
    q = affine.quantize_affine(W, bits, (1, g), symmetric=sym)
    np.testing.assert_allclose(q.dequantize(np.float64), reference_rtn(W, bits, g, sym), rtol=1e-5, atol=1e-5)


@settings(max_examples=150, deadline=None)
@given(W=matrices, bits=st.integers(2, 8), g=st.sampled_from([1, 5, 16, -1]), sym=st.booleans(),
       zd=st.sampled_from(["int", "float"]))
def test_rtn_error_at_most_half_a_step(W, bits, g, sym, zd):
    q = affine.quantize_affine(W, bits, (1, g), symmetric=sym, zero_domain=zd)
    assert q.codes.dtype == np.uint8 and q.codes.max(initial=0) <= 2**bits - 1
    step = affine.block_expand(q.scale, W.shape, q.block_size)
    err = np.abs(q.dequantize(np.float64) - W)
    # exact arithmetic gives <= step / 2; float32 scale and products add a few ulps of |x|
    ulps = 4 * np.finfo(np.float32).eps * np.abs(W)
    assert np.all(err <= step / 2 + ulps + 1e-6)


@settings(max_examples=100, deadline=None)
@given(W=matrices, bits=st.integers(2, 8), g=st.sampled_from([2, 7, -1]), sym=st.booleans())
def test_zero_is_on_the_grid(W, bits, g, sym):
    W = W.copy()
    W[:, ::3] = 0
    q = affine.quantize_affine(W, bits, (1, g), symmetric=sym)
    assert np.all(q.dequantize()[:, ::3] == 0)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("sym", [False, True])
def test_constant_and_all_zero_groups(bits, sym):
    W = np.zeros((4, 64), np.float32)
    W[1] = 0.37
    W[2] = -5.0
    W[3, :32] = 2.5  # constant group next to an all-zero group in one row
    q = affine.quantize_affine(W, bits, (1, 32), symmetric=sym)
    deq = q.dequantize()
    assert np.all(deq[0] == 0) and np.all(deq[3, 32:] == 0)
    assert np.all(q.scale[0] == 1)  # all-zero block: scale 1, nothing else meaningful
    if not sym:  # asymmetric: a constant block sits exactly at one end of its grid
        np.testing.assert_allclose(deq[1:], W[1:], rtol=1e-6)
    assert np.all(np.isfinite(deq))


def test_ragged_last_group_576_by_128():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((6, 576)).astype(np.float32)
    q = affine.quantize_affine(W, 4, 128)
    assert q.scale.shape == (6, 5) and q.zero.shape == (6, 5)
    np.testing.assert_allclose(q.dequantize(np.float64), reference_rtn(W, 4, 128, False), rtol=1e-5, atol=1e-6)
    # the last group's scale depends only on its 64 columns
    last = W[:, 512:]
    lo, hi = np.minimum(last.min(1), 0), np.maximum(last.max(1), 0)
    np.testing.assert_allclose(q.scale[:, 4], (hi - lo) / 15, rtol=1e-6)


def test_granularities_by_block_size():
    rng = np.random.default_rng(1)
    W = rng.standard_normal((8, 96)).astype(np.float32)
    assert affine.quantize_affine(W, 4, W.shape).scale.shape == (1, 1)
    assert affine.quantize_affine(W, 4, (-1, -1)).scale.shape == (1, 1)
    assert affine.quantize_affine(W, 4, (1, -1)).scale.shape == (8, 1)
    assert affine.quantize_affine(W, 4, (1, 32)).scale.shape == (8, 3)
    assert affine.quantize_affine(W, 4, (4, 32)).scale.shape == (2, 3)  # 2-D tiles work too
    assert affine.quantize_affine(W[0], 4, (10,)).scale.shape == (10,)  # 1-D vectors, ragged last block
    cfg = affine.AffineConfig(bits=3, group_size=None)
    assert cfg.block_size(W.shape) == (1, -1)


@settings(max_examples=60, deadline=None)
@given(W=matrices, bits=st.integers(2, 6), sym=st.booleans())
def test_mse_search_never_worse_than_minmax(W, bits, sym):
    bs = (1, 8)
    mm = affine.quantize_affine(W, bits, bs, symmetric=sym)
    ms = affine.quantize_affine(W, bits, bs, symmetric=sym, method="mse", grid=20)
    e_mm = affine.block_reduce(np.add, (mm.dequantize(np.float64) - W) ** 2, mm.block_size)
    e_ms = affine.block_reduce(np.add, (ms.dequantize(np.float64) - W) ** 2, ms.block_size)
    assert np.all(e_ms <= e_mm * (1 + 1e-6) + 1e-12)


def test_mse_search_clips_heavy_tails():
    rng = np.random.default_rng(2)
    W = rng.standard_t(2, (16, 256)).astype(np.float32)
    e = {m: np.linalg.norm(affine.quantize_affine(W, 3, (1, -1), method=m).dequantize() - W) for m in ("minmax", "mse")}
    assert e["mse"] < 0.95 * e["minmax"]


def test_float_zero_domain_keeps_real_zero():
    W = np.array([[0.1, 0.2, 0.35, 0.9]], np.float32)
    q = affine.quantize_affine(W, 3, (1, -1), zero_domain="float")
    assert q.zero.dtype == np.float32
    qi = affine.quantize_affine(W, 3, (1, -1))
    assert qi.zero.dtype == np.int32


def test_float64_input_with_a_tiny_range():
    W = np.array([[1e-300, 2e-300, 0.0, -1e-300]], np.float64)
    q = affine.quantize_affine(W, 4, (1, -1))
    assert np.isfinite(q.scale).all() and 0 <= q.zero.min() and q.zero.max() <= 15
    assert np.all(np.abs(q.dequantize(np.float64) - W) <= q.scale / 2 + 1e-300)


class TestBadInput:
    def test_range_overflowing_float32(self):
        W = np.array([[3e38, -3e38, 1.0]], np.float32)
        with pytest.raises(InputError, match="range exceeds the largest float32"):
            affine.quantize_affine(W, 4, (1, -1))

    @pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
    def test_nan_inf_refused(self, bad):
        W = np.ones((2, 8), np.float32)
        W[1, 3] = bad
        with pytest.raises(InputError, match=r"NaN or Inf \(first at index \(1, 3\)\)"):
            affine.quantize_affine(W, 4, 4)

    @pytest.mark.parametrize("bits", [0, 1, 9, 4.0])
    def test_bits_out_of_range(self, bits):
        with pytest.raises(UsageError, match="bits must be an integer in 2..8"):
            affine.quantize_affine(np.ones((2, 8), np.float32), bits, 4)

    def test_block_size_rank_mismatch(self):
        with pytest.raises(UsageError, match="has 3 entries"):
            affine.quantize_affine(np.ones((2, 8), np.float32), 4, (1, 1, 4))
        with pytest.raises(UsageError, match=">= 1 or -1"):
            affine.quantize_affine(np.ones((2, 8), np.float32), 4, (1, 0))

    def test_non_numeric(self):
        with pytest.raises(InputError, match="real numeric"):
            affine.quantize_affine(np.array([["a", "b"]]), 4, 2)

    def test_unknown_method(self):
        with pytest.raises(UsageError, match="method must be"):
            affine.quantize_affine(np.ones((2, 8), np.float32), 4, 4, method="best")
