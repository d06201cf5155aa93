"""Binary hash codes: the one binarize / pack / Hamming routine used everywhere.

Conventions (shared by training, export, index and service):

* A bit is ``z >= 0``: sign with 0 (and -0.0) mapped to +1, i.e. ``b = (z >= 0)``.
* Codes are packed row-wise with ``np.packbits(bits, axis=1)`` (NumPy's default
  big bit order: bit 0 of a code is the most significant bit of byte 0), so a
  ``bits``-long code takes ``bits // 8`` bytes; ``bits`` must be a multiple of 8.
* Hamming distance d_H(a, b) = popcount(a XOR b), returned as ``uint16``
  (``uint32`` beyond 65535 bits) so that stable sorts use NumPy's radix sort.
"""
from __future__ import annotations

import numpy as np

from hashret.errors import BadInput

# Elements (query rows x database rows) of one XOR temporary in `hamming`.
HAMMING_CHUNK_ELEMENTS = 1 << 22

_POP8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _popcount_table(x: np.ndarray) -> np.ndarray:
    """Per-element popcount via a 256-entry byte table (fallback for numpy < 2)."""
    x = np.ascontiguousarray(x)
    by = x.view(np.uint8).reshape(x.shape + (x.dtype.itemsize,))
    return _POP8[by].sum(axis=-1, dtype=np.uint8)


_popcount = getattr(np, "bitwise_count", _popcount_table)


MIN_BITS, MAX_BITS = 8, 4096


def check_bits(bits, what: str = "codes") -> int:
    """The one code-length rule: a multiple of 8 (codes are packed into whole bytes, and FAISS
    and Milvus binary vectors need it) between 8 and 4096. Returns the length as an int."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise BadInput(f"{what} | bit count {bits!r} is not an integer: pass e.g. 32 or 64")
    bits = int(bits)
    if not (MIN_BITS <= bits <= MAX_BITS) or bits % 8:
        raise BadInput(
            f"{what} | {bits} bits is not a multiple of 8 between {MIN_BITS} and {MAX_BITS}: "
            "use a code length such as 16, 32, 48 or 64"
        )
    return bits


def binarize(z) -> np.ndarray:
    """Bits of real-valued codes: b = (z >= 0), i.e. sign(z) with 0 -> +1.

    Accepts any float or signed-integer array (any shape, usually [N, bits]); a
    bool array is returned unchanged. Unsigned integers are refused because a
    uint8 array here is almost always already-packed codes.
    """
    z = np.asarray(z)
    if z.dtype == np.bool_:
        return z
    if np.issubdtype(z.dtype, np.floating):
        if np.isnan(z).any():
            raise BadInput("codes | contain NaN: check the model output before hashing")
        return z >= 0
    if np.issubdtype(z.dtype, np.signedinteger):
        return z >= 0
    if np.issubdtype(z.dtype, np.unsignedinteger):
        raise BadInput(
            f"codes | got {z.dtype} values, which look like packed codes: "
            "pass real-valued outputs, or unpack(packed, bits) first"
        )
    raise BadInput(f"codes | dtype {z.dtype} is not numeric: pass float outputs of the hash layer")


def to_signs(z) -> np.ndarray:
    """±1 codes as float32: s = 2*(z >= 0) - 1 (for metrics/losses that want signs)."""
    b = binarize(z)
    return np.where(b, np.float32(1), np.float32(-1))


def pack(z_or_bits) -> np.ndarray:
    """Packed codes uint8 [N, bits//8] = packbits(binarize(z), axis=1).

    A bool array [N, bits] is packed as is; anything else is binarized first.
    """
    b = binarize(z_or_bits)
    if b.ndim != 2:
        raise BadInput(
            f"codes | shape {b.shape} is not [N, bits]: reshape a single code to [1, bits]"
        )
    check_bits(b.shape[1])
    return np.packbits(b, axis=1)


def check_packed(packed, bits: int | None = None, what: str = "codes") -> np.ndarray:
    """Validate packed codes (uint8, 2-D, width bits//8) and return them as an array."""
    p = np.asarray(packed)
    if p.dtype != np.uint8:
        raise BadInput(
            f"{what} | dtype {p.dtype} is not uint8 packed codes: pack them with hashret.codes.pack"
        )
    if p.ndim != 2:
        raise BadInput(f"{what} | shape {p.shape} is not [N, bytes]: reshape to 2-D")
    if p.shape[1] == 0:
        raise BadInput(f"{what} | have 0 bytes per code: pack codes of at least 8 bits")
    if bits is not None:
        bits = check_bits(bits, what)
        if p.shape[1] != bits // 8:
            raise BadInput(
                f"{what} | have {p.shape[1]} bytes ({p.shape[1] * 8} bits) per code, "
                f"expected {bits // 8} bytes ({bits} bits): use codes of the same bit length"
            )
    return p


def unpack(packed, bits: int) -> np.ndarray:
    """Bits bool [N, bits] of packed codes (inverse of `pack`)."""
    p = check_packed(packed, bits)
    return np.unpackbits(p, axis=1, count=bits).astype(bool)


def _as_words(packed: np.ndarray) -> np.ndarray:
    """View [N, nb] uint8 rows as [N, w] unsigned words (widest itemsize dividing nb)."""
    p = np.ascontiguousarray(packed)
    nb = p.shape[1]
    for size, dt in ((8, np.uint64), (4, np.uint32), (2, np.uint16)):
        if nb % size == 0:
            return p.view(dt)
    return p


def hamming(qpacked, dbpacked, chunk: int | None = None) -> np.ndarray:
    """Hamming distances D[i, j] = popcount(q_i XOR b_j), shape [Q, N].

    Returns uint16 (uint32 for codes over 65535 bits). Work is chunked over
    queries (`chunk` rows at a time, default so that chunk*N <= 4M) so the
    temporaries stay bounded; the [Q, N] result itself is the caller's to size.
    """
    q = check_packed(qpacked, what="query codes")
    d = check_packed(dbpacked, what="database codes")
    if q.shape[1] != d.shape[1]:
        a, b = q.shape[1], d.shape[1]
        raise BadInput(
            f"codes | query codes have {a} bytes ({a * 8} bits), database codes {b} bytes "
            f"({b * 8} bits): encode both with the same model and bit length"
        )
    Q, N = q.shape[0], d.shape[0]
    out_dt = np.uint16 if q.shape[1] * 8 <= np.iinfo(np.uint16).max else np.uint32
    out = np.zeros((Q, N), dtype=out_dt)
    if Q == 0 or N == 0:
        return out
    if chunk is None:
        chunk = max(1, HAMMING_CHUNK_ELEMENTS // N)
    elif isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise BadInput(f"hamming chunk | {chunk!r} is not a positive integer: pass e.g. 64")
    qw = _as_words(q)
    dwT = np.ascontiguousarray(_as_words(d).T)  # [w, N]: one contiguous row per word
    for s in range(0, Q, chunk):
        e = min(Q, s + chunk)
        acc = out[s:e]
        for k in range(dwT.shape[0]):
            x = np.bitwise_xor(qw[s:e, k, None], dwT[k][None, :])
            acc += _popcount(x)
    return out
