"""Every int8 kernel, on every backend and ISA, equals the numpy reference exactly."""
import numpy as np
import pytest

from qkit import ext
from qkit.errors import InputError, QkitError
from qkit.ext import reference

from backends import BACKENDS, IDS, W4A8_BACKENDS, W4A8_IDS  # noqa: E402

# many-against-many also has the AVX-512 VNNI path (ext/csrc/gemm_i8.c)
MANY, MANY_IDS = W4A8_BACKENDS, W4A8_IDS
LENGTHS = [1, 31, 33, 127, 129, 1000]
PAIRS = [(np.int8, np.int8), (np.uint8, np.int8), (np.int8, np.uint8), (np.uint8, np.uint8)]


def rand(rng, dtype, shape):
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max + 1, size=shape, dtype=dtype)


def adversarial(dq, dx, d):
    """Extreme operands: all min, all max, all zero, and each pair of type extremes."""
    iq, ix = np.iinfo(dq), np.iinfo(dx)
    cases = []
    for vq in (iq.min, iq.max, 0):
        for vx in (ix.min, ix.max, 0):
            cases.append((np.full(d, vq, dtype=dq), np.full((3, d), vx, dtype=dx)))
    return cases


@pytest.mark.parametrize("backend,isa", BACKENDS, ids=IDS)
@pytest.mark.parametrize("dq,dx", PAIRS, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("d", LENGTHS)
def test_scan_matches_reference(backend, isa, dq, dx, d):
    rng = np.random.default_rng(d)
    cases = [(rand(rng, dq, d), rand(rng, dx, (37, d)))] + adversarial(dq, dx, d)
    for q, X in cases:
        assert np.array_equal(ext.dot(q, X, backend=backend, isa=isa), reference.dot(q, X))
        assert np.array_equal(ext.l2sq(q, X, backend=backend, isa=isa), reference.l2sq(q, X))


@pytest.mark.parametrize("backend,isa", MANY, ids=MANY_IDS)
@pytest.mark.parametrize("dq,dx", PAIRS, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("d", [0, 1, 3, 4, 33, 129])
def test_many_matches_reference(backend, isa, dq, dx, d):
    rng = np.random.default_rng(100 + d)
    Q = rand(rng, dq, (5, d))
    X = rand(rng, dx, (23, d))
    Q[0] = np.iinfo(dq).min
    X[0] = np.iinfo(dx).max
    out = ext.dot_many(Q, X, backend=backend, isa=isa)
    assert out.dtype == np.int32 and out.shape == (5, 23)
    assert np.array_equal(out, reference.dot_many(Q, X))
    assert np.array_equal(ext.l2sq_many(Q, X, backend=backend, isa=isa), reference.l2sq_many(Q, X))


@pytest.mark.parametrize("backend,isa", MANY, ids=MANY_IDS)
@pytest.mark.parametrize("nq,nx", [(3, 6000), (1, 31), (4, 32), (7, 33), (9, 65)])
def test_many_ragged_tiles_and_panels(backend, isa, nq, nx):
    """Query tiles of 4 and row panels of 32 (the VNNI path) and the L2 blocks (AVX2) with ragged ends; the
    extremes of every type pair against each other."""
    rng = np.random.default_rng(nq * 1000 + nx)
    for dq, dx in PAIRS:
        Q, X = rand(rng, dq, (nq, 37)), rand(rng, dx, (nx, 37))
        Q[-1], X[-1] = np.iinfo(dq).min, np.iinfo(dx).max
        Q[0, :5], X[0, :5] = np.iinfo(dq).max, np.iinfo(dx).min
        assert np.array_equal(ext.dot_many(Q, X, backend=backend, isa=isa), reference.dot_many(Q, X))
        assert np.array_equal(ext.l2sq_many(Q, X, backend=backend, isa=isa), reference.l2sq_many(Q, X))


@pytest.mark.parametrize("backend,isa", MANY, ids=MANY_IDS)
@pytest.mark.parametrize("dq,dx", PAIRS, ids=lambda t: np.dtype(t).name)
def test_many_at_max_dim_is_exact(backend, isa, dq, dx):
    """The longest vectors the int32 contract allows, every term at its largest magnitude: the VNNI path's
    offset identity passes 2^31 in between and must still land on the exact result."""
    for op, fn, ref in (("dot", ext.dot_many, reference.dot_many), ("l2", ext.l2sq_many, reference.l2sq_many)):
        d = ext.max_dim(op, dq, dx)
        iq, ix = np.iinfo(dq), np.iinfo(dx)
        Q = np.stack([np.full(d, iq.min, dq), np.full(d, iq.max, dq)])
        X = np.stack([np.full(d, ix.max, dx), np.full(d, ix.min, dx), np.zeros(d, dx)])
        assert np.array_equal(fn(Q, X, backend=backend, isa=isa), ref(Q, X).astype(np.int32)), (op, d)


@pytest.mark.parametrize("backend,isa", BACKENDS, ids=IDS)
def test_many_blocks_across_cache_tiles(backend, isa):
    # enough rows that the C kernel's L2 blocking (256 KB of Y) cuts Y into several blocks with a ragged last one
    rng = np.random.default_rng(7)
    Q = rand(rng, np.int8, (3, 100))
    X = rand(rng, np.int8, (6000, 100))
    assert np.array_equal(ext.dot_many(Q, X, backend=backend, isa=isa), reference.dot_many(Q, X))


@pytest.mark.parametrize("backend,isa", BACKENDS, ids=IDS)
def test_worst_case_at_max_dim_does_not_overflow(backend, isa):
    # the longest vector the int32 contract allows, every term at its largest magnitude
    d = ext.max_dim("l2", np.int8, np.uint8)
    q = np.full(d, -128, dtype=np.int8)
    X = np.full((2, d), 255, dtype=np.uint8)
    got = ext.l2sq(q, X, backend=backend, isa=isa)
    assert got.tolist() == [d * 383 * 383] * 2
    assert got.max() <= 2**31 - 1


def test_empty_rows_and_zero_length():
    for backend, isa in BACKENDS:
        assert ext.dot(np.zeros(4, np.int8), np.zeros((0, 4), np.int8), backend=backend, isa=isa).shape == (0,)
        assert ext.dot(np.zeros(0, np.int8), np.zeros((3, 0), np.int8), backend=backend, isa=isa).tolist() == [0] * 3


@pytest.mark.parametrize("backend,isa", BACKENDS, ids=IDS)
def test_read_only_and_offset_views(backend, isa):
    # a row-slice of a bigger array is contiguous but starts at an odd address; read-only input (mmap) is fine
    rng = np.random.default_rng(3)
    buf = rand(rng, np.int8, (50 * 33 + 1,))
    X = buf[1:].reshape(50, 33)
    X.flags.writeable = False
    q = X[7].copy()
    assert np.array_equal(ext.dot(q, X, backend=backend, isa=isa), reference.dot(q, X))


class TestBadInput:
    def test_wrong_dtype_names_expected_and_got(self):
        with pytest.raises(InputError, match="expected dtype int8 or uint8, got float32"):
            ext.dot(np.zeros(4, np.float32), np.zeros((2, 4), np.int8))
        with pytest.raises(ValueError, match="int16"):
            ext.l2sq(np.zeros(4, np.int8), np.zeros((2, 4), np.int16))

    def test_wrong_ndim(self):
        with pytest.raises(InputError, match=r"expected a 2-D array, got shape \(4,\)"):
            ext.dot(np.zeros(4, np.int8), np.zeros(4, np.int8))
        with pytest.raises(InputError, match="1-D"):
            ext.dot(np.zeros((1, 4), np.int8), np.zeros((2, 4), np.int8))

    def test_dimension_mismatch(self):
        with pytest.raises(InputError, match="query has 5 dims but rows have 4"):
            ext.dot(np.zeros(5, np.int8), np.zeros((2, 4), np.int8))
        with pytest.raises(InputError, match="queries has 3 dims"):
            ext.dot_many(np.zeros((2, 3), np.int8), np.zeros((2, 4), np.int8))

    def test_non_contiguous(self):
        X = np.zeros((4, 8), np.int8)[:, ::2]
        with pytest.raises(InputError, match="C-contiguous"):
            ext.dot(np.zeros(4, np.int8), X)

    def test_not_an_array(self):
        with pytest.raises(InputError, match="numpy array, got list"):
            ext.dot([1, 2], np.zeros((2, 2), np.int8))

    def test_too_long_for_int32(self):
        d = ext.max_dim("dot", np.int8, np.int8) + 1
        with pytest.raises(InputError, match="exact in int32 only up to"):
            ext.dot(np.zeros(d, np.int8), np.zeros((1, d), np.int8))

    def test_unknown_backend_and_isa(self):
        with pytest.raises(QkitError, match="unknown kernel backend"):
            ext.dot(np.zeros(4, np.int8), np.zeros((2, 4), np.int8), backend="cuda")
        if ext.native_available():
            with pytest.raises(QkitError, match="unknown ISA"):
                ext.dot(np.zeros(4, np.int8), np.zeros((2, 4), np.int8), backend="native", isa="neon")

    @pytest.mark.skipif(not ext.native_available(), reason="the compiled extension is not built here")
    def test_cython_layer_refuses_bad_arrays_itself(self):
        from qkit.ext import _kernels

        with pytest.raises(ValueError, match="contiguous"):
            _kernels.scan("dot", np.zeros(4, np.int8), np.zeros((4, 8), np.int8)[:, ::2], _kernels.ISA_SCALAR)
        with pytest.raises(ValueError, match="int8 or uint8"):
            _kernels.scan("dot", np.zeros(4, np.int8), np.zeros((2, 4), np.int32), _kernels.ISA_SCALAR)
        with pytest.raises(ValueError, match="dims"):
            _kernels.scan_many("l2", np.zeros((2, 3), np.int8), np.zeros((2, 4), np.int8), _kernels.ISA_SCALAR)


def test_backend_selection_from_environment(monkeypatch):
    import subprocess
    import sys

    code = "import logging,sys; logging.basicConfig(stream=sys.stdout, level=logging.INFO); " \
           "from qkit import ext; print('chosen', ext.default_backend())"
    for want in ("numba", "numpy"):
        env = {**__import__("os").environ, "QKIT_KERNELS": want}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
        assert f"chosen {want}" in out and f"qkit kernels: {want}" in out
    env = {**__import__("os").environ, "QKIT_KERNELS": "gpu"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "QKIT_KERNELS='gpu'" in r.stderr
