"""Packing round trips (hypothesis) and layouts checked against loop translations of GPTQ and AutoAWQ."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qkit import packing as P
from qkit.errors import InputError, UsageError


@st.composite
def codes_and_bits(draw, max_side=40):
    bits = draw(st.integers(1, 8))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=max_side))
    codes = draw(hnp.arrays(np.uint8, shape, elements=st.integers(0, 2**bits - 1)))
    axis = draw(st.integers(-codes.ndim, codes.ndim - 1))
    return codes, bits, axis


@settings(max_examples=300, deadline=None)
@given(codes_and_bits())
def test_pack_bits_round_trip(cba):
    codes, bits, axis = cba
    n = codes.shape[axis]
    packed = P.pack_bits(codes, bits, axis)
    assert packed.dtype == np.uint8 and packed.shape[axis] == P.packed_length(n, bits)
    assert np.array_equal(P.unpack_bits(packed, bits, n, axis), codes)


@settings(max_examples=200, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), words=st.integers(1, 4), cols=st.integers(1, 9), data=st.data())
def test_int32_round_trip_both_axes(bits, words, cols, data):
    n = int(words * 32 // np.gcd(32, bits))
    codes = data.draw(hnp.arrays(np.uint8, (n, cols), elements=st.integers(0, 2**bits - 1)))
    qw = P.pack_gptq_qweight(codes, bits)
    assert qw.dtype == np.int32 and qw.shape == (n * bits // 32, cols)
    assert np.array_equal(P.unpack_gptq_qweight(qw, bits), codes)
    qz = P.pack_gptq_qzeros(codes.T, bits)
    assert qz.shape == (cols, n * bits // 32)
    assert np.array_equal(P.unpack_gptq_qzeros(qz, bits), codes.T)


def test_nibble_layout_low_nibble_is_even_index():
    assert P.pack_nibbles(np.array([1, 2, 0xF, 0x3], np.uint8)).tolist() == [0x21, 0x3F]
    assert P.pack_nibbles(np.array([5, 6, 7], np.uint8)).tolist() == [0x65, 0x07]  # odd count: zero-padded


def test_two_and_three_bit_layouts():
    assert P.pack_bits(np.array([1, 2, 3, 0], np.uint8), 2).tolist() == [0b00111001]
    # 3-bit: c0..c7 = 1..7,0 -> stream LSB first: 001 010 011 100 101 110 111 000
    c = np.array([1, 2, 3, 4, 5, 6, 7, 0], np.uint8)
    stream = sum(int(v) << (3 * k) for k, v in enumerate(c))
    assert P.pack_bits(c, 3).tolist() == [(stream >> (8 * b)) & 0xFF for b in range(3)]


def test_one_bit_matches_numpy_little_bitorder():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2, (7, 77)).astype(np.uint8)
    assert np.array_equal(P.pack_bits(bits, 1), np.packbits(bits, axis=-1, bitorder="little"))


def gptq_reference_pack(intweight, bits):
    """Loop translation of the GPTQ reference's QuantLinear.pack (intweight: (in, out))."""
    iw = intweight.astype(np.uint32)
    qweight = np.zeros((iw.shape[0] // 32 * bits, iw.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                qweight[row] |= iw[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:  # 3 bits: 32 codes over three words
            for j in range(i, i + 10):
                qweight[row] |= iw[j] << (3 * (j - i))
            i += 10
            qweight[row] |= iw[i] << 30
            row += 1
            qweight[row] |= (iw[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= iw[j] << (3 * (j - i) + 1)
            i += 10
            qweight[row] |= iw[i] << 31
            row += 1
            qweight[row] |= (iw[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= iw[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return qweight.view(np.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_qweight_matches_reference_pack(bits):
    rng = np.random.default_rng(bits)
    iw = rng.integers(0, 2**bits, (96, 11)).astype(np.uint8)
    assert np.array_equal(P.pack_gptq_qweight(iw, bits), gptq_reference_pack(iw, bits))


def awq_reference_pack(intweight):
    """Loop translation of AutoAWQ's WQLinear_GEMM packing (intweight: (in, out), 4 bits)."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    iw = intweight.astype(np.uint32)
    out = np.zeros((iw.shape[0], iw.shape[1] // 8), dtype=np.uint32)
    for col in range(iw.shape[1] // 8):
        for i in range(8):
            out[:, col] |= iw[:, col * 8 + order[i]] << (i * 4)
    return out.view(np.int32)


def test_awq_matches_reference_pack_and_round_trips():
    rng = np.random.default_rng(5)
    iw = rng.integers(0, 16, (13, 64)).astype(np.uint8)
    packed = P.pack_awq(iw)
    assert np.array_equal(packed, awq_reference_pack(iw))
    assert np.array_equal(P.unpack_awq(packed), iw)


class TestBadInput:
    def test_codes_out_of_range(self):
        with pytest.raises(InputError, match=r"codes must lie in \[0, 15\]"):
            P.pack_nibbles(np.array([16], np.uint8))
        with pytest.raises(InputError, match="codes must lie"):
            P.pack_bits(np.array([-1], np.int16), 4)

    def test_float_codes(self):
        with pytest.raises(InputError, match="must be integers"):
            P.pack_bits(np.array([1.0]), 4)

    def test_int32_needs_whole_words(self):
        with pytest.raises(InputError, match="multiple of 32"):
            P.pack_gptq_qweight(np.zeros((40, 2), np.uint8), 3)
        with pytest.raises(InputError, match="multiple of 8"):
            P.pack_gptq_qweight(np.zeros((12, 2), np.uint8), 4)

    def test_unpack_length_mismatch(self):
        with pytest.raises(InputError, match="need 2 bytes"):
            P.unpack_bits(np.zeros(3, np.uint8), 4, 4)

    def test_awq_only_4_bits_and_multiple_of_8(self):
        with pytest.raises(UsageError):
            P.pack_awq(np.zeros((2, 8), np.uint8), bits=3)
        with pytest.raises(InputError, match="multiple of 8 columns"):
            P.pack_awq(np.zeros((2, 12), np.uint8))

    def test_bits_out_of_range(self):
        with pytest.raises(UsageError):
            P.pack_bits(np.zeros(4, np.uint8), 9)


def test_signed_int4_layout_and_round_trip():
    # -1 -> 0xF, 2 -> 0x2, -8 -> 0x8, 7 -> 0x7; low nibble = even index
    assert P.pack_int4_signed(np.array([-1, 2, -8, 7])).tolist() == [0x2F, 0x78]
    v = np.arange(-8, 8).repeat(3)
    assert np.array_equal(P.unpack_int4_signed(P.pack_int4_signed(v), v.size), v)
    with pytest.raises(InputError, match=r"\[-8, 7\]"):
        P.pack_int4_signed(np.array([8]))


def test_bit_planes_layout():
    # codes 1, 2, 3 with B = 2: plane 0 = bits (1, 0, 1) -> 0b101, plane 1 = bits (0, 1, 1) -> 0b110
    assert P.pack_bit_planes(np.array([1, 2, 3]), 2).tolist() == [[0b101], [0b110]]
    assert P.pack_bit_planes(np.full(9, 15), 4).tolist() == [[255, 1]] * 4


def test_fastscan_layout_and_round_trip():
    codes = np.zeros((33, 2), np.uint8)
    codes[0, 0] = 0x3   # block 0, vector 0 -> low nibble of byte 0, sub-space 0
    codes[16, 0] = 0xA  # block 0, vector 16 -> high nibble of byte 0
    codes[17, 1] = 0x5  # vector 17 -> high nibble of byte 1, sub-space 1
    codes[32, 1] = 0x7  # block 1, vector 0, sub-space 1
    b = P.pack_fastscan(codes)
    assert b.shape == (2, 2, 16)
    assert b[0, 0, 0] == 0xA3 and b[0, 1, 1] == 0x50 and b[1, 1, 0] == 0x07
    assert int(b.sum()) == 0xA3 + 0x50 + 0x07
    rng = np.random.default_rng(0)
    for n in (1, 32, 45):
        c = rng.integers(0, 16, (n, 5)).astype(np.uint8)
        assert np.array_equal(P.unpack_fastscan(P.pack_fastscan(c), n), c)
