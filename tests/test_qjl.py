"""QJL: the fast estimator equals the paper's formula; unbiased, with the variance theory predicts; codes and state."""
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkit.errors import FormatError, InputError, UsageError
from qkit.qjl import (QJL, code_norms, code_signs, jl_matrix, prod_qjl_reference, prod_qjl_variance,
                      sign_dot, sign_dot_quantized)


def pair(d, cos, seed=0):
    """q, x with ||q|| = 2, ||x|| = 3 and cos(q, x) = cos."""
    rng = np.random.default_rng(seed)
    a, b = np.linalg.qr(rng.standard_normal((d, 2)))[0].T
    return 2.0 * (cos * a + math.sqrt(1 - cos**2) * b), 3.0 * a


def estimates_over_seeds(q, x, m, seeds):
    """ProdQJL(q, x) for a fresh S per seed."""
    out = []
    for s in seeds:
        c = QJL(len(x), m, s)
        out.append(c.inner_products(q, c.encode(x[None]))[0])
    return np.array(out)


# ---------------------------------------------------------------- fast path == reference
@pytest.mark.parametrize("d,m", [(13, 13), (50, 50), (50, 200), (64, 7), (128, 128), (1, 9)])
def test_inner_products_equal_reference(d, m):
    rng = np.random.default_rng(d * 1000 + m)
    X, q = rng.standard_normal((40, d)), rng.standard_normal(d)
    c = QJL(d, m, seed=5)
    ref = np.array([prod_qjl_reference(q, x, c.S) for x in X])
    got = c.inner_products(q, c.encode(X))
    # the norm is stored as float32: agreement to its rounding, relative to the scale of the sum
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 * np.abs(ref).max())


def test_distances_ip_and_derived_l2():
    rng = np.random.default_rng(1)
    X, q = rng.standard_normal((30, 24)), rng.standard_normal(24)
    ip, l2 = QJL(24, 40, 2, metric="ip"), QJL(24, 40, 2, metric="l2")
    codes = ip.encode(X)
    est = np.array([prod_qjl_reference(q, x, ip.S) for x in X])
    np.testing.assert_allclose(ip.distances(q, codes), -est, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l2.distances(q, codes), q @ q + (X * X).sum(1) - 2 * est, rtol=1e-5, atol=1e-4)
    assert QJL(24, 40, 2, metric="cosine").distances(q, codes).dtype == np.float32


def test_sign_dot_table_equals_unpacked_sum():
    """Both branches (one gather for few rows, a loop over bytes for many) against the unpacked signs."""
    rng = np.random.default_rng(2)
    c = QJL(20, 37, seed=1)
    codes = c.encode(rng.standard_normal((1500, 20)))
    Sq = rng.standard_normal(37)
    want = code_signs(codes, 37) @ Sq
    np.testing.assert_allclose(sign_dot(Sq, codes), want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(sign_dot(Sq, codes[:10]), want[:10], rtol=0, atol=1e-12)


@pytest.mark.parametrize("bits,limit", [(8, 0.01), (4, 0.2)])
def test_quantized_query_error_is_small_against_qjl_noise(bits, limit):
    """query_bits: S q on a grid; the added error is a small fraction of QJL's own standard deviation."""
    rng = np.random.default_rng(3)
    d, m = 64, 256
    X, q = rng.standard_normal((2000, d)), rng.standard_normal(d)
    exact, fast = QJL(d, m, 4), QJL(d, m, 4, query_bits=bits)
    codes = exact.encode(X)
    diff = fast.inner_products(q, codes) - exact.inner_products(q, codes)
    qjl_std = math.sqrt(math.pi / 2 * (q @ q) * d / m)   # sqrt(prod_qjl_variance) at <q, x> = 0, ||x||^2 ~ d
    assert np.sqrt(np.mean(diff**2)) < limit * qjl_std
    Sq = exact.S @ q
    np.testing.assert_allclose(sign_dot_quantized(Sq, codes, bits), sign_dot(Sq, codes),
                               atol=4 * np.sqrt(m) * (np.ptp(Sq) / (2**bits - 1)))


# ---------------------------------------------------------------- statistics over the seed
@pytest.mark.parametrize("cos", [0.0, 0.6, 0.95])
def test_unbiased_and_variance_matches_theory(cos):
    d, m, n = 32, 64, 2000
    q, x = pair(d, cos)
    est = estimates_over_seeds(q, x, m, range(n))
    err = est - q @ x
    assert abs(err.mean()) < 3 * err.std(ddof=1) / math.sqrt(n)
    want = math.sqrt(prod_qjl_variance(q, x, m))
    assert abs(err.std(ddof=1) / want - 1) < 0.10


def test_error_scales_as_one_over_sqrt_m():
    d, n = 16, 800
    q, x = pair(d, 0.5, seed=1)
    stds = {}
    for m in (128, 512, 2048):
        err = estimates_over_seeds(q, x, m, range(10_000, 10_000 + n)) - q @ x
        stds[m] = err.std(ddof=1)
        assert abs(stds[m] / math.sqrt(prod_qjl_variance(q, x, m)) - 1) < 0.10
    assert abs(stds[128] / stds[2048] / 4 - 1) < 0.15


def test_decode_is_the_estimators_vector_and_has_the_predicted_mse():
    d, m = 24, 48
    rng = np.random.default_rng(4)
    x, q = rng.standard_normal(d), rng.standard_normal(d)
    rel = []
    for s in range(400):
        c = QJL(d, m, s)
        code = c.encode(x[None])
        xh = c.decode(code)[0].astype(np.float64)
        assert xh @ q == pytest.approx(c.inner_products(q, code)[0], rel=1e-5, abs=1e-5)
        rel.append(((xh - x) ** 2).sum() / (x @ x))
    assert np.mean(rel) == pytest.approx((math.pi / 2 * d - 1) / m, rel=0.10)


# ---------------------------------------------------------------- corner cases
@pytest.mark.parametrize("query_bits", [None, 4])
def test_zero_vectors_give_no_nan(query_bits):
    d = 13
    c, l2 = QJL(d, query_bits=query_bits), QJL(d, metric="l2", query_bits=query_bits)
    X = np.zeros((3, d))
    X[1, 4] = 2.0
    codes = c.encode(X)
    assert np.array_equal(code_norms(codes, d), [0.0, 2.0, 0.0])
    assert np.array_equal(c.decode(codes)[[0, 2]], np.zeros((2, d)))
    q = np.ones(d)
    for query in (q, np.zeros(d)):
        for codec in (c, l2):
            assert np.isfinite(codec.distances(query, codes)).all()
    assert np.array_equal(c.inner_products(np.zeros(d), codes), np.zeros(3))
    np.testing.assert_allclose(l2.distances(q, codes)[[0, 2]], [q @ q, q @ q])


@pytest.mark.parametrize("d,m", [(50, None), (13, None), (13, 5), (50, 130)])
def test_codes_round_trip_signs_and_norms(d, m):
    rng = np.random.default_rng(d)
    X = rng.standard_normal((17, d)).astype(np.float32)
    c = QJL(d, m, seed=9)
    m = c.m
    codes = c.encode(X)
    assert codes.shape == (17, -(-m // 8) + 4) and codes.dtype == np.uint8
    assert c.bytes_per_vector == -(-m // 8) + 4
    want = np.where(X.astype(np.float64) @ c.S.T >= 0, 1.0, -1.0)
    assert np.array_equal(code_signs(codes, m), want)
    assert np.array_equal(code_norms(codes, m), np.linalg.norm(X.astype(np.float64), axis=1).astype(np.float32))
    if m % 8:   # padding bits of the last sign byte are zero
        assert not (codes[:, m // 8] >> (m % 8)).any()
    assert np.array_equal(c.encode(X[3]), codes[3])


def test_bad_inputs_are_refused():
    c = QJL(10, 16)
    with pytest.raises(InputError):
        c.encode(np.ones((2, 11)))
    with pytest.raises(InputError):
        c.encode(np.full((1, 10), np.nan))
    with pytest.raises(InputError):
        c.distances(np.ones(9), c.encode(np.ones((2, 10))))
    with pytest.raises(InputError):
        c.distances(np.ones(10), np.zeros((2, 5), np.uint8))
    with pytest.raises(InputError):   # one query at a time
        c.distances(np.ones((2, 10)), c.encode(np.ones((2, 10))))
    for kw in ({"m": 0}, {"seed": -1}, {"metric": "hamming"}, {"query_bits": 9}):
        with pytest.raises(UsageError):
            QJL(10, **kw)


# ---------------------------------------------------------------- state
@pytest.mark.parametrize("query_bits", [None, 6])
def test_state_round_trip(query_bits):
    c = QJL(50, 70, seed=123, metric="l2", query_bits=query_bits)
    params, arrays = c.state()
    assert arrays == {}                                   # S comes back from the seed, never from the file
    params = json.loads(json.dumps(params))
    c2 = QJL.from_state(50, "l2", params, arrays)
    assert np.array_equal(c2.S, c.S) and c2.query_bits == query_bits
    X, q = np.random.default_rng(0).standard_normal((9, 50)), np.linspace(-1, 1, 50)
    codes = c.encode(X)
    assert np.array_equal(c2.encode(X), codes)
    assert np.array_equal(c2.distances(q, codes), c.distances(q, codes))
    assert np.array_equal(jl_matrix(50, 200, 123)[:70], c.S)    # S of m rows = first m rows of a longer S


def test_state_refuses_bad_or_foreign_parameters():
    params, arrays = QJL(8, 16, seed=1).state()
    with pytest.raises(FormatError):
        QJL.from_state(8, "ip", {"seed": 1}, arrays)
    with pytest.raises(FormatError):
        QJL.from_state(8, "ip", dict(params, m="many"), arrays)
    with pytest.raises(FormatError):   # a random stream other than the one the codes were made with
        QJL.from_state(8, "ip", dict(params, probe=[p + 1e-3 for p in params["probe"]]), arrays)
    with pytest.raises(FormatError):
        QJL.from_state(8, "ip", dict(params, probe="abc"), arrays)


# ---------------------------------------------------------------- shapes (hypothesis)
@settings(max_examples=60, deadline=None)
@given(d=st.integers(1, 70), m=st.one_of(st.none(), st.integers(1, 100)), n=st.integers(0, 5),
       seed=st.integers(0, 2**32 - 1))
def test_encode_shapes(d, m, n, seed):
    c = QJL(d, m, seed)
    X = np.random.default_rng(seed).standard_normal((n, d))
    codes = c.encode(X)
    assert codes.shape == (n, c.bytes_per_vector) and codes.dtype == np.uint8
    assert c.bytes_per_vector == -(-(d if m is None else m) // 8) + 4
    assert c.decode(codes).shape == (n, d)
    assert c.distances(np.ones(d), codes).shape == (n,)
