"""RaBitQ: the fast path against a numpy transcription of the paper, unbiasedness, the variance law, files."""
import math

import numpy as np
import pytest

from qkit.errors import FormatError, UsageError
from qkit.rabitq import RaBitQ, choose_codes, reference_estimate


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_estimator_equals_reference_transcription(bits):
    rng = np.random.default_rng(bits)
    D = 40
    X = rng.normal(size=(60, D)).astype(np.float32)
    q = rng.normal(size=D).astype(np.float32)
    rq = RaBitQ(D, bits, query_bits=None, seed=3).fit(X)
    codes = rq.encode(X)
    c = rq.centroid.astype(np.float64)
    est = rq.estimate_o_dot(_unit(q - c), codes)
    ref = [reference_estimate(X[i].astype(np.float64), q.astype(np.float64), c, rq.rot.matrix(), bits)
           for i in range(12)]
    np.testing.assert_allclose(est[:12], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [5, 7, 9])
def test_many_bit_codes_reach_the_best_cosine(bits):
    """For B >= 5 the scaling search is a grid: its cosine must come within 1e-4 of the exact walk's.

    (Measured gaps: 0 at B = 5, up to 1.5e-5 at B = 7, 1e-6 at B = 9; the estimator's variance moves by
    (1 - cos^2) / cos^2, so such gaps are invisible in recall.)"""
    rng = np.random.default_rng(bits)
    Op = _unit(rng.normal(size=(20, 24)))
    _, M, cos = choose_codes(Op, bits)
    L = 2 ** (bits - 1)
    for a, c in zip(np.abs(Op), cos):
        ts = sorted({k / ai for ai in a for k in range(1, L)})
        mids = [t * (1 + 1e-9) for t in ts]
        best = max(float((np.minimum(np.floor(t * a), L - 1) + 0.5) @ a) /
                   np.linalg.norm(np.minimum(np.floor(t * a), L - 1) + 0.5) for t in mids)
        assert c >= best - 1e-4


def test_one_bit_query_quantized_path_is_unbiased_and_close_to_float():
    rng = np.random.default_rng(0)
    D = 128
    X = rng.normal(size=(500, D)).astype(np.float32)
    q = rng.normal(size=D).astype(np.float32)
    rq4 = RaBitQ(D, 1, query_bits=4, seed=1).fit(X)
    rqf = RaBitQ(D, 1, query_bits=None, seed=1).fit(X)
    codes = rq4.encode(X)
    v = q - rq4.centroid
    f = rqf.estimate_o_dot(v, codes)
    runs = np.stack([rq4.estimate_o_dot(v, codes, rng=np.random.default_rng(s)) for s in range(200)])
    err = runs.mean(0) - f         # randomized rounding: the 4-bit query is unbiased for the float one
    se = runs.std(0) / np.sqrt(len(runs))
    assert np.mean(np.abs(err) < 3 * se + 1e-6) > 0.97
    # and the 4-bit query adds little to the 1-bit code's own error (section 3.3.1)
    o = X - rq4.centroid
    true = (o / np.linalg.norm(o, axis=1, keepdims=True)) @ v
    assert np.abs(runs[0] - f).mean() < 0.3 * np.abs(f - true).mean()


@pytest.mark.parametrize("bits", [1, 4])
def test_unbiased_over_seeds(bits):
    """Mean error of est <o, q> over random rotations within 3 standard errors of zero (Theorem 3.2)."""
    rng = np.random.default_rng(10)
    D = 64
    x, q = rng.normal(size=D), rng.normal(size=D)
    o, qr = _unit(x), _unit(q)
    errs = []
    for s in range(400):
        rq = RaBitQ(D, bits, query_bits=None, seed=s)
        rq.centroid = np.zeros(D, np.float32)
        errs.append(rq.estimate_o_dot(qr, rq.encode(x[None].astype(np.float32)))[0] - o @ qr)
    errs = np.array(errs)
    assert abs(errs.mean()) < 3 * errs.std() / math.sqrt(len(errs))


def _normalized_errors(D, bits, n=1500, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, D)).astype(np.float32)
    q = rng.normal(size=D)
    rq = RaBitQ(D, bits, query_bits=None, seed=seed + 1)
    rq.centroid = np.zeros(D, np.float32)
    codes = rq.encode(X)
    o, qr = _unit(X.astype(np.float64)), _unit(q)
    e = rq.estimate_o_dot(qr, codes) - o @ qr
    y, _, w = rq.grid(codes)
    cos = 1 / (w * np.linalg.norm(y, axis=1))
    # the paper's variance: (1 - <o_bar,o>^2) / <o_bar,o>^2 * (1 - <o,q>^2) / (D - 1)
    sd = np.sqrt((1 - cos ** 2) / cos ** 2 * (1 - (o @ qr) ** 2) / (D - 1))
    return e, sd, np.abs(e) <= rq.error_bound(codes)


def test_error_std_matches_the_paper_and_scales_as_one_over_sqrt_D():
    stds = {}
    for D in (128, 512, 2048):
        e, sd, covered = _normalized_errors(D, 1, n=1200 if D < 2048 else 600)
        assert np.std(e / sd) == pytest.approx(1.0, rel=0.10)
        assert covered.mean() > 0.9     # eps0 = 1.9 covers ~94% (a coordinate of a random unit vector)
        stds[D] = e.std()
    assert stds[128] / stds[512] == pytest.approx(2.0, rel=0.15)
    assert stds[512] / stds[2048] == pytest.approx(2.0, rel=0.15)


def test_more_bits_less_error():
    errs = [np.std(_normalized_errors(96, b, n=400)[0]) for b in (1, 2, 3, 4, 6)]
    assert all(a > 1.6 * b for a, b in zip(errs, errs[1:]))     # ~2x per extra bit (Extended RaBitQ)


def test_distances_l2_ip_and_batch_agree():
    rng = np.random.default_rng(2)
    D = 50
    X = rng.normal(size=(300, D)).astype(np.float32) + 3
    Q = rng.normal(size=(4, D)).astype(np.float32) + 3
    rq = RaBitQ(D, 4, query_bits=None, rotation="hadamard").fit(X)   # 50 pads to 56 for the Hadamard
    codes = rq.encode(X)
    assert rq.bytes_per_vector == 7 + 21 + 8 and rq.D == 56
    for metric in ("l2", "ip"):
        many = rq.distances_many(Q, codes, metric)
        for i in range(len(Q)):
            np.testing.assert_allclose(rq.distances(Q[i], codes, metric), many[i], rtol=1e-4, atol=1e-3)
    true = ((X[None] - Q[:, None]) ** 2).sum(-1)
    assert np.median(np.abs(rq.distances_many(Q, codes) - true) / true) < 0.02
    np.testing.assert_allclose(-rq.distances_many(Q, codes, "ip"), Q @ X.T, rtol=0.05, atol=0.5)


def test_edge_cases_and_state():
    D = 16
    X = np.zeros((5, D), np.float32)
    X[1] = 1.0
    rq = RaBitQ(D, 3).fit(X)
    codes = rq.encode(X)             # vectors equal to the centroid: r = 0, no NaN anywhere
    assert np.isfinite(rq.decode(codes)).all() and np.isfinite(rq.distances(X[1], codes)).all()
    params, arrays = rq.state()
    rq2 = RaBitQ.from_state(D, params, arrays)
    np.testing.assert_array_equal(rq2.encode(X), codes)
    with pytest.raises(FormatError):
        RaBitQ.from_state(D, {"bits": 3}, arrays)
    with pytest.raises(UsageError, match="1..9"):
        RaBitQ(D, 10)
    with pytest.raises(UsageError, match="not trained"):
        RaBitQ(D, 1).encode(X)
