"""qkit.rotation: orthogonality, inverses, seeds, Hadamard constructions, fast transform vs dense."""
import numpy as np
import pytest
import scipy.linalg

from qkit.errors import UsageError
from qkit.rotation import (KINDS, fwht, from_state, hadamard_factor, make_rotation, paley_hadamard)


@pytest.mark.parametrize("m", [12, 20, 24, 28, 36, 44, 60])
def test_paley_matrices_are_hadamard(m):
    H = paley_hadamard(m)
    assert H is not None and set(np.unique(H)) == {-1.0, 1.0}
    np.testing.assert_array_equal(H @ H.T, m * np.eye(m))


@pytest.mark.parametrize("d,want", [(64, (64, 1)), (576, (16, 36)), (1536, (128, 12)), (768, (64, 12)),
                                    (50, None), (100, None)])
def test_hadamard_factor(d, want):
    assert hadamard_factor(d) == want


def test_fwht_equals_dense_sylvester():
    x = np.random.default_rng(0).normal(size=(3, 256))
    np.testing.assert_allclose(fwht(x), x @ scipy.linalg.hadamard(256).T, atol=1e-9)


@pytest.mark.parametrize("kind,d", [(k, d) for k in KINDS for d in (2, 17, 64, 576)] + [("hadamard", 1536)])
def test_orthogonal_invertible_and_seeded(kind, d):
    kw = {"pad": True} if kind == "hadamard" else {}
    r = make_rotation(kind, d, seed=5, **kw)
    R = r.matrix()
    assert R.shape == (r.dim_out, d)
    np.testing.assert_allclose(R.T @ R, np.eye(d), atol=1e-5)
    x = np.random.default_rng(1).normal(size=(7, d)).astype(np.float32)
    y = r.apply(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(r.inverse(y), x, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1), rtol=1e-5)
    np.testing.assert_array_equal(from_state(r.state()).apply(x), y)         # seed + sizes rebuild it exactly
    if d > 8:   # tiny Hadamards have few sign patterns: two seeds may share one
        assert not np.allclose(make_rotation(kind, d, seed=6, **kw).matrix(), R)


def test_hadamard_never_pads_a_residual_stream():
    with pytest.raises(UsageError, match="no Hadamard matrix of order 50"):
        make_rotation("hadamard", 50)
    r = make_rotation("hadamard", 50, pad=True)
    assert r.dim_out == 56 and r.pad


@pytest.mark.parametrize("kind", ["orthogonal", "kac", "hadamard"])
def test_one_coordinate_over_seeds_follows_the_sphere_law(kind):
    """Coordinate 0 of R e1 over random seeds: mean 0, variance 1/d, kurtosis 3d/(d+2) (uniform on the sphere).

    Only a Haar rotation has this exactly; the Hadamard's entries are +-1/sqrt(d), so its coordinate is a
    Rademacher variable: variance 1/d as well, kurtosis 1. That difference is the point of the test."""
    d, n = 16, 1500
    e = np.zeros(d)
    e[0] = 1
    x = np.array([make_rotation(kind, d, s).apply(e)[0] for s in range(n)])
    assert abs(x.mean()) < 4 * np.sqrt(1 / d / n)
    assert x.var() == pytest.approx(1 / d, rel=0.12)
    kurt = np.mean(x ** 4) / x.var() ** 2
    want = 1.0 if kind == "hadamard" else 3 * d / (d + 2)
    assert kurt == pytest.approx(want, rel=0.12)
