"""Tests for hashret.codes against slow pure-Python references."""
import numpy as np
import pytest

from hashret import codes
from hashret.codes import binarize, check_bits, check_packed, hamming, pack, to_signs, unpack
from hashret.errors import BadInput


def ref_pack(bits):
    """Pack bool rows MSB-first into bytes with plain loops."""
    out = []
    for row in bits:
        bs = []
        for s in range(0, len(row), 8):
            v = 0
            for b in row[s : s + 8]:
                v = (v << 1) | int(bool(b))
            bs.append(v)
        out.append(bs)
    return np.array(out, dtype=np.uint8).reshape(len(bits), -1)


def ref_hamming(q, d):
    """Hamming distance by counting differing bits byte by byte."""
    return [[sum(bin(int(a) ^ int(b)).count("1") for a, b in zip(qi, dj)) for dj in d] for qi in q]


def test_binarize_zero_maps_to_plus_one():
    z = np.array([[-1.5, -0.0, 0.0, 1e-30, -1e-30, 2.0, 0.0, -3.0]])
    assert binarize(z).tolist() == [[False, True, True, True, False, True, True, False]]
    assert to_signs(z).tolist() == [[-1, 1, 1, 1, -1, 1, 1, -1]]
    assert to_signs(z).dtype == np.float32


@pytest.mark.parametrize("dt", [np.float16, np.float32, np.float64, np.int8, np.int64])
def test_binarize_dtypes_agree(dt):
    rng = np.random.default_rng(1)
    z = np.round(rng.normal(size=(5, 16)) * 3)
    z[0, :4] = 0
    want = [[x >= 0 for x in row] for row in z.tolist()]
    assert binarize(z.astype(dt)).tolist() == want


def test_binarize_rejects_nan_and_unsigned():
    with pytest.raises(BadInput, match="NaN"):
        binarize(np.array([[0.5, np.nan]]))
    with pytest.raises(BadInput, match="packed"):
        pack(np.zeros((2, 2), np.uint8))
    with pytest.raises(BadInput, match="not numeric"):
        binarize(np.array([["a"]]))


@pytest.mark.parametrize("bits", [8, 16, 24, 64, 128])
def test_pack_matches_reference_and_roundtrips(bits):
    rng = np.random.default_rng(bits)
    z = rng.normal(size=(7, bits)).astype(np.float32)
    z[:, 0] = 0.0  # zero -> bit 1
    p = pack(z)
    assert p.dtype == np.uint8 and p.shape == (7, bits // 8)
    assert np.array_equal(p, ref_pack((z >= 0).tolist()))
    assert np.all(p[:, 0] & 0x80)  # first bit is the MSB of byte 0
    b = unpack(p, bits)
    assert b.dtype == np.bool_ and np.array_equal(b, z >= 0)
    assert np.array_equal(pack(b), p)  # bool input is packed directly


@pytest.mark.parametrize("bits", [12, 7, 33])
def test_pack_bits_not_multiple_of_8(bits):
    with pytest.raises(BadInput, match=f"{bits} bits is not a multiple of 8 between 8 and 4096"):
        pack(np.ones((2, bits), np.float32))


@pytest.mark.parametrize("bits", [0, -8, 4104, 12, True, 8.0, "64"])
def test_check_bits_one_rule(bits):
    with pytest.raises(BadInput, match="--bits"):
        check_bits(bits, "--bits")


@pytest.mark.parametrize("bits", [8, 64, np.int64(128), 4096])
def test_check_bits_accepts(bits):
    assert check_bits(bits) == int(bits)


def test_pack_shape_errors():
    with pytest.raises(BadInput, match="not \\[N, bits\\]"):
        pack(np.ones(16))
    with pytest.raises(BadInput, match="0 bits"):
        pack(np.ones((3, 0)))


def test_check_packed():
    p = np.zeros((3, 4), np.uint8)
    assert check_packed(p, 32) is not None
    with pytest.raises(BadInput, match="not uint8"):
        check_packed(p.astype(np.int16), 32)
    with pytest.raises(BadInput, match="not \\[N, bytes\\]"):
        check_packed(p[0], 32)
    with pytest.raises(BadInput, match="4 bytes \\(32 bits\\).*expected 8 bytes \\(64 bits\\)"):
        check_packed(p, 64)
    with pytest.raises(BadInput, match="20 bits"):
        unpack(p, 20)


@pytest.mark.parametrize("nbytes", [1, 2, 3, 4, 6, 8, 12, 16])
@pytest.mark.parametrize("chunk", [None, 1, 4])
def test_hamming_matches_reference(nbytes, chunk):
    rng = np.random.default_rng(nbytes)
    q = rng.integers(0, 256, size=(9, nbytes), dtype=np.uint8)
    d = rng.integers(0, 256, size=(13, nbytes), dtype=np.uint8)
    d[0] = q[0]  # a zero distance
    d[1] = ~q[1]  # maximal distance
    h = hamming(q, d, chunk=chunk)
    assert h.shape == (9, 13) and h.dtype == np.uint16
    assert h.tolist() == ref_hamming(q.tolist(), d.tolist())
    assert h[0, 0] == 0 and h[1, 1] == nbytes * 8


def test_hamming_non_contiguous_input():
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, size=(10, 16), dtype=np.uint8)
    q, d = big[::2, :8], big[1::2, 8:]
    assert hamming(q, d).tolist() == ref_hamming(q.tolist(), d.tolist())


def test_hamming_width_mismatch():
    with pytest.raises(
        BadInput, match=r"query codes have 8 bytes \(64 bits\), database codes 4 bytes \(32 bits\)"
    ):
        hamming(np.zeros((2, 8), np.uint8), np.zeros((3, 4), np.uint8))


def test_hamming_bad_chunk_and_empty():
    with pytest.raises(BadInput, match="chunk"):
        hamming(np.zeros((2, 1), np.uint8), np.zeros((2, 1), np.uint8), chunk=0)
    assert hamming(np.zeros((0, 2), np.uint8), np.zeros((3, 2), np.uint8)).shape == (0, 3)


def test_popcount_fallback_matches():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 2**63, size=(4, 5), dtype=np.uint64)
    want = [[bin(int(v)).count("1") for v in row] for row in x.tolist()]
    assert codes._popcount_table(x).tolist() == want
    assert codes._popcount_table(x.astype(np.uint8)).tolist() == [
        [bin(int(v) & 0xFF).count("1") for v in row] for row in x.tolist()
    ]
