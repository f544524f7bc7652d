"""Low-bit kernels: every backend and ISA equals the numpy reference exactly (float32 queries: see below)."""
import numpy as np
import pytest

from qkit import ext
from qkit import packing as P
from qkit.errors import InputError
from qkit.ext import reference as R

from backends import BACKENDS, IDS  # noqa: E402
DIMS = [1, 2, 31, 33, 64, 127, 128, 129, 1000]


def int4_rows(rng, n, d, signed, fill=None):
    if fill is not None:
        v = np.full((n, d), fill)
    else:
        v = rng.integers(-8, 8, (n, d)) if signed else rng.integers(0, 16, (n, d))
    return v, (P.pack_int4_signed(v) if signed else P.pack_nibbles(v.astype(np.uint8)))


@pytest.mark.parametrize("backend,isa", BACKENDS, ids=IDS)
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("d", DIMS)
def test_int4_int8_query_exact(backend, isa, signed, d):
    rng = np.random.default_rng(d)
    lo, hi = (-8, 7) if signed else (0, 15)
    cases = [(rng.integers(-128, 128, d, dtype=np.int8), int4_rows(rng, 37, d, signed)[1])]
    for qv in (-128, 127, 0):
        for fill in (lo, hi, 0, -1 if signed else 1):
            cases.append((np.full(d, qv, np.int8), int4_rows(rng, 3, d, signed, fill)[1]))
    cases.append((rng.integers(-128, 128, d, dtype=np.int8), int4_rows(rng, 1, d, signed)[1]))  # one vector
    for q, codes in cases:
        for fn, ref in ((ext.int4_dot, R.int4_dot), (ext.int4_l2sq, R.int4_l2sq)):
            got = fn(q, codes, d, signed=signed, backend=backend, isa=isa)
            assert got.dtype == np.int32
            assert np.array_equal(got, ref(q, codes, d, signed))


@pytest.mark.parametrize("backend,isa", BACKENDS, ids=IDS)
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("d", [1, 33, 128, 129])
def test_int4_float_query(backend, isa, signed, d):
    """float32 sums: exact when every partial sum is representable, else equal up to summation order."""
    rng = np.random.default_rng(10 + d)
    _, codes = int4_rows(rng, 29, d, signed)
    q_int = rng.integers(-50, 50, d).astype(np.float32)  # integer-valued: all sums exact in float32
    q_real = rng.standard_normal(d).astype(np.float32)
    for fn, ref in ((ext.int4_dot, R.int4_dot), (ext.int4_l2sq, R.int4_l2sq)):
        got = fn(q_int, codes, d, signed=signed, backend=backend, isa=isa)
        assert got.dtype == np.float32 and np.array_equal(got, ref(q_int, codes, d, signed))
        np.testing.assert_allclose(fn(q_real, codes, d, signed=signed, backend=backend, isa=isa),
                                   ref(q_real, codes, d, signed), rtol=2e-5, atol=2e-4)


@pytest.mark.parametrize("backend,isa", BACKENDS, ids=IDS)
def test_int4_padding_nibble_is_ignored(backend, isa):
    rng = np.random.default_rng(1)
    d = 65
    _, codes = int4_rows(rng, 10, d, False)
    dirty = codes.copy()
    dirty[:, -1] |= 0xF0  # garbage in the unused high nibble of the last byte
    q = rng.integers(-128, 128, d, dtype=np.int8)
    for fn in (ext.int4_dot, ext.int4_l2sq):
        assert np.array_equal(fn(q, dirty, backend=backend, isa=isa), fn(q, codes, backend=backend, isa=isa))


@pytest.mark.parametrize("backend,isa", BACKENDS, ids=IDS)
@pytest.mark.parametrize("nbytes", [1, 2, 7, 8, 15, 16, 17, 24, 100])
def test_hamming_exact(backend, isa, nbytes):
    rng = np.random.default_rng(nbytes)
    cases = [(rng.integers(0, 256, nbytes, dtype=np.uint8), rng.integers(0, 256, (41, nbytes), dtype=np.uint8))]
    for a in (0, 255):
        for b in (0, 255):
            cases.append((np.full(nbytes, a, np.uint8), np.full((5, nbytes), b, np.uint8)))
    cases.append((cases[0][0], cases[0][1][:1]))
    for q, codes in cases:
        assert np.array_equal(ext.hamming(q, codes, backend=backend, isa=isa), R.hamming(q, codes))


@pytest.mark.parametrize("backend,isa", BACKENDS, ids=IDS)
@pytest.mark.parametrize("nbytes", [1, 9, 16, 32])
@pytest.mark.parametrize("B", [1, 2, 4, 5, 6, 8, 9, 16])
def test_and_popcount_exact(backend, isa, nbytes, B):
    rng = np.random.default_rng(B * 100 + nbytes)
    cases = [(rng.integers(0, 256, (B, nbytes), dtype=np.uint8), rng.integers(0, 256, (n, nbytes), dtype=np.uint8))
             for n in (1, 2, 3, 4, 5, 37)]
    cases.append((np.full((B, nbytes), 255, np.uint8), np.full((6, nbytes), 255, np.uint8)))  # every bit set
    cases.append((np.full((B, nbytes), 255, np.uint8), np.zeros((3, nbytes), np.uint8)))
    for planes, codes in cases:
        assert np.array_equal(ext.and_popcount(planes, codes, backend=backend, isa=isa), R.and_popcount(planes, codes))


@pytest.mark.parametrize("backend,isa", BACKENDS, ids=IDS)
def test_and_popcount_is_inner_product_with_query_codes(backend, isa):
    rng = np.random.default_rng(3)
    d, B = 128, 4
    bits = rng.integers(0, 2, (50, d)).astype(np.uint8)
    qc = rng.integers(0, 2**B, d)
    got = ext.and_popcount(P.pack_bit_planes(qc, B), P.pack_bits(bits, 1), backend=backend, isa=isa)
    assert np.array_equal(got, bits.astype(np.int64) @ qc)


@pytest.mark.parametrize("backend,isa", BACKENDS, ids=IDS)
@pytest.mark.parametrize("M", [1, 2, 3, 31, 32, 33])
@pytest.mark.parametrize("n", [1, 31, 32, 33, 100])
def test_fastscan_exact(backend, isa, M, n):
    rng = np.random.default_rng(M * 1000 + n)
    codes = rng.integers(0, 16, (n, M)).astype(np.uint8)
    lut = rng.integers(0, 256, (M, 16)).astype(np.uint8)
    blocks = P.pack_fastscan(codes)
    got = ext.fastscan(lut, blocks, n, backend=backend, isa=isa)
    assert np.array_equal(got, R.fastscan(lut, blocks, n))
    assert np.array_equal(got, lut[np.arange(M)[None, :], codes].sum(1))  # straight from the unpacked codes


@pytest.mark.parametrize("backend,isa", BACKENDS, ids=IDS)
def test_fastscan_maximum_tables_past_uint16(backend, isa):
    # 600 sub-spaces of 255: 153,000 per vector, beyond uint16, through the 512-sub-space flush
    M, n = 600, 70
    lut = np.full((M, 16), 255, np.uint8)
    codes = np.random.default_rng(0).integers(0, 16, (n, M)).astype(np.uint8)
    got = ext.fastscan(lut, P.pack_fastscan(codes), n, backend=backend, isa=isa)
    assert got.tolist() == [255 * M] * n


class TestBadInput:
    def test_int4_shapes(self):
        with pytest.raises(InputError, match="int4 rows of 10 codes need 5 bytes"):
            ext.int4_dot(np.zeros(10, np.int8), np.zeros((3, 6), np.uint8))
        with pytest.raises(InputError, match="expected dtype int8 or float32, got float64"):
            ext.int4_dot(np.zeros(10), np.zeros((3, 5), np.uint8))
        with pytest.raises(InputError, match="expected dtype uint8, got int8"):
            ext.int4_l2sq(np.zeros(10, np.int8), np.zeros((3, 5), np.int8))

    def test_hamming_and_planes(self):
        with pytest.raises(InputError, match="query has 3 bytes but codes have 4"):
            ext.hamming(np.zeros(3, np.uint8), np.zeros((2, 4), np.uint8))
        with pytest.raises(InputError, match="1..16 query bit planes, got 17"):
            ext.and_popcount(np.zeros((17, 4), np.uint8), np.zeros((2, 4), np.uint8))
        with pytest.raises(InputError, match="C-contiguous"):
            ext.hamming(np.zeros(4, np.uint8), np.zeros((2, 8), np.uint8)[:, ::2])

    def test_fastscan_shapes(self):
        lut = np.zeros((4, 16), np.uint8)
        with pytest.raises(InputError, match="16 entries per sub-space"):
            ext.fastscan(np.zeros((4, 8), np.uint8), np.zeros((1, 4, 16), np.uint8), 3)
        with pytest.raises(InputError, match=r"blocks of shape \(4, 16\)"):
            ext.fastscan(lut, np.zeros((1, 5, 16), np.uint8), 3)
        with pytest.raises(InputError, match="hold at most 32 vectors, asked for 33"):
            ext.fastscan(lut, np.zeros((1, 4, 16), np.uint8), 33)

    @pytest.mark.skipif(not ext.native_available(), reason="the compiled extension is not built here")
    def test_cython_layer_checks(self):
        from qkit.ext import _kernels as K

        with pytest.raises(ValueError, match="need 5 bytes"):
            K.int4_scan("dot", np.zeros(10, np.int8), np.zeros((2, 4), np.uint8), 10, False, K.ISA_SCALAR)
        with pytest.raises(ValueError, match="at most 32"):
            K.fastscan(np.zeros((4, 16), np.uint8), np.zeros((1, 4, 16), np.uint8), 40, K.ISA_SCALAR)
        with pytest.raises(ValueError, match="expected dtype uint8"):
            K.hamming(np.zeros(4, np.int8), np.zeros((1, 4), np.uint8), K.ISA_SCALAR)
