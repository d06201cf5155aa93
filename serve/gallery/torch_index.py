"""Exact Hamming search on a torch device ("torch-flat"): the FAISS gallery's storage, a GPU scan.

For galleries too large to scan on the CPU within a request's budget. Everything durable is
FaissGallery's, unchanged: codes, ids and metadata in memory in insertion order, the WAL, the
snapshots, the manifest and their checks (serve/gallery/faiss_index.py). Only the index differs:
`TorchFlatIndex` keeps a copy of the packed codes on the device and answers FAISS's
`add` / `search` calls with a brute-force popcount scan, so the gallery treats it exactly like
`IndexBinaryFlat` (built lazily, appended to on upsert, rebuilt after a replace or delete).

Results equal faiss-flat's item for item: distances are exact, and ties go to the lower row
(the item inserted first). A chunk of rows is scanned in three steps, each a pass over small
values rather than a sort of wide keys (a radix select costs one pass per few bits of its key,
so 16-bit distances beat 64-bit `distance | row` keys several times over at 100M codes):

1. distances as int16 [Q, rows]: one fused CuPy kernel (`__popcll` of the XOR, per 64-bit word)
   where CuPy runs on the CUDA device, else torch's XOR and a SWAR bit count;
2. per query, the k-th smallest distance t (from a histogram of the distances), then every row
   below t and the first rows (in row order, by a running count) at t, exactly k in all;
3. those k as `distance << 40 | row` keys, sorted; chunks merge by a top-k over the keys.

The fused kernel checks itself against the torch count on its first scan and is dropped (with
a warning) if they differ or it fails to build, so a CuPy problem costs speed, never answers.
Rows are scanned in chunks whose temporaries fit `CHUNK_BYTES` (on a GPU, up to an eighth of
its free memory); a CUDA out-of-memory error halves the chunk and retries, so a large batch of
queries slows down instead of failing.

The gallery option `device` (cuda, cuda:N or cpu; default cuda) is sealed in the manifest by
`hashret index build --search-device`; `hashret serve --search-device` overrides it for one
process. Creating a gallery never touches the device (build on a CPU host, serve on a GPU one);
opening one for a CUDA device that this host lacks is refused, so a server never starts on a
device it cannot search with.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from hashret.engines.base import torch_oom_errors
from hashret.errors import BadInput, Unavailable, first_line
from serve.gallery.base import index_kind
from serve.gallery.faiss_index import FaissGallery

log = logging.getLogger("hashret.gallery")

DEFAULT_DEVICE = "cuda"
ROW_BITS = 40  # rows per key: up to 2**40 codes; the distance sits above them
#: bytes of scan temporaries per chunk (see _pair_bytes) on the CPU, and at least on a GPU
CHUNK_BYTES = 256 << 20
MAX_GPU_CHUNK_BYTES = 8 << 30
#: per (query, code) pair, the selection's temporaries: the int16 distance, its int32 copy shifted
#: per query for the histogram, three masks and a running count (int32)
_SELECT_BYTES = 2 + 4 + 3 + 4
_WORD = 8  # codes are scanned as int64 words; a code whose width is not a multiple is zero-padded

_M1, _M2, _M4 = 0x5555555555555555, 0x3333333333333333, 0x0F0F0F0F0F0F0F0F


def check_device(device: Any, what: str = "index option device") -> str:
    """`device` as a canonical string (cpu, cuda, cuda:N), or BadInput naming the accepted forms."""
    if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", device.strip()):
        raise BadInput(f"{what} {device!r} | must be cpu, cuda or cuda:N")
    return device.strip()


def resolve_device(device: str, what: str):
    """The torch.device for `device`, refusing a CUDA device this host does not have."""
    import torch

    device = check_device(device, what)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise Unavailable(
                f"{what} {device} | torch sees no CUDA GPU here (torch {torch.__version__}): serve on a GPU host, "
                f"or search on the CPU with --search-device cpu (faiss-flat is faster there)"
            )
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise Unavailable(
                f"{what} {device} | this host has {torch.cuda.device_count()} CUDA device(s): "
                f"use cuda:0..cuda:{torch.cuda.device_count() - 1}"
            )
    return torch.device(device)


def popcount64(x):
    """Set bits per element of an int64 tensor (SWAR: shifts, masks and adds; torch has no popcount).

    Arithmetic right shifts of negative words bring in ones, and subtraction may wrap: both
    are harmless, since each step masks to the bit fields it keeps.
    """
    x = x - ((x >> 1) & _M1)
    x = (x & _M2) + ((x >> 2) & _M2)
    x = (x + (x >> 4)) & _M4
    x = x + (x >> 8)
    x = x + (x >> 16)
    x = x + (x >> 32)
    return x & 0x7F


class TorchFlatIndex:
    """Packed codes on a torch device, with the slice of FAISS's binary index API the gallery uses.

    `add(codes)` appends rows (amortized growth on the device); `search(queries, k)` returns
    (distances int32 [Q, k], rows int64 [Q, k]) sorted by (distance, row), k <= ntotal.
    """

    def __init__(self, bits: int, device, chunk_bytes: int | None = None):
        import torch

        self.torch = torch
        self.d = int(bits)
        self.device = device
        self.nbytes = self.d // 8
        self.words = -(-self.nbytes // _WORD)
        self.ntotal = 0
        self.chunk_bytes = None if chunk_bytes is None else int(chunk_bytes)  # None: chosen at the first search
        self._db = torch.zeros((0, self.words), dtype=torch.int64, device=device)
        self.broken = False  # an add failed (device memory): the gallery rebuilds before searching
        # the fused distance kernel: None untried, False unavailable here
        self._fused = None if device.type == "cuda" else False

    def _words(self, codes: np.ndarray):
        codes = np.ascontiguousarray(codes, np.uint8)
        if codes.ctypes.data % _WORD:  # a view at an odd offset: int64 words must be aligned
            codes = codes.copy()
        pad = self.words * _WORD - codes.shape[1]
        if pad:
            codes = np.concatenate([codes, np.zeros((len(codes), pad), np.uint8)], axis=1)
        return self.torch.from_numpy(codes.view(np.int64).reshape(len(codes), self.words))

    def add(self, codes: np.ndarray) -> None:
        if self.broken or not len(codes):
            return
        try:
            rows = self._words(codes).to(self.device)
            need = self.ntotal + len(rows)
            if need > len(self._db):
                grown = self.torch.empty((max(need, 2 * len(self._db), 1024), self.words),
                                         dtype=self.torch.int64, device=self.device)
                grown[: self.ntotal] = self._db[: self.ntotal]
                self._db = grown
            self._db[self.ntotal : need] = rows
            self.ntotal = need
        except torch_oom_errors() as e:
            # The write is already durable (WAL) and in the host arrays: never fail it for the device
            # copy. Free what this index holds; the next search rebuilds it, or reports the shortage.
            self.release()
            self.broken = True
            log.warning("torch-flat | out of device memory adding %d codes (%s): the index is rebuilt on the "
                        "next search", len(codes), first_line(e))

    def release(self) -> None:
        self._db = self.torch.zeros((0, self.words), dtype=self.torch.int64, device=self.device)
        self.ntotal = 0
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()

    def bytes_on_device(self) -> int:
        return int(self._db.numel() * self._db.element_size())

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        k = min(int(k), self.ntotal)
        if k < 1 or not len(queries):
            return np.zeros((len(queries), 0), np.int32), np.zeros((len(queries), 0), np.int64)
        q = self._words(queries).to(self.device)
        if self.chunk_bytes is None:  # once: a driver call per search is not worth it
            self.chunk_bytes = self._default_chunk_bytes()
        rows = max(k, self.chunk_bytes // (self._pair_bytes() * len(q)))
        while True:
            try:
                keys = self._scan(q, k, rows)
                break
            except torch_oom_errors():
                if rows <= k:
                    raise Unavailable(
                        f"torch-flat on {self.device} | out of device memory scanning {len(q)} queries even "
                        f"{rows} codes at a time: send fewer queries per call or free the device"
                    ) from None
            # out of the except block: the error's traceback no longer holds the scan's temporaries
            rows = max(k, rows // 2)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            log.warning("torch-flat | out of device memory: scanning %d codes per chunk and retrying", rows)
        keys = keys.cpu().numpy()
        return (keys >> ROW_BITS).astype(np.int32), keys & ((1 << ROW_BITS) - 1)

    def _default_chunk_bytes(self) -> int:
        """The scan's temporaries per chunk: CHUNK_BYTES, or on a GPU an eighth of its free memory
        up to MAX_GPU_CHUNK_BYTES, so that a large gallery is scanned in one or a few chunks (each
        chunk is a dozen kernel launches and a device sync). Less memory later is met by the
        out-of-memory halving."""
        if self.device.type != "cuda":
            return CHUNK_BYTES
        free, _ = self.torch.cuda.mem_get_info(self.device)
        return max(CHUNK_BYTES, min(free // 8, MAX_GPU_CHUNK_BYTES))

    @property
    def scan_method(self) -> str:
        """How distances are counted: "cupy-popc" (the fused kernel) or "torch-swar"."""
        return "cupy-popc" if self._fused else "torch-swar"

    def _pair_bytes(self) -> int:
        """Scan temporaries per (query, code): the selection's, plus the torch count's XOR words
        and two SWAR intermediates (8 bytes each) where it counts."""
        return _SELECT_BYTES + (0 if self._fused else 3 * self.words * _WORD)

    def _scan(self, q, k: int, rows: int):
        """The k smallest keys per query over all rows, `rows` codes at a time."""
        torch = self.torch
        best = None
        for a in range(0, self.ntotal, rows):
            b = min(self.ntotal, a + rows)
            top = smallest_keys(self._distances(q, a, b), min(k, b - a), a, self.d)
            best = top if best is None else torch.topk(
                torch.cat([best, top], dim=1), k, dim=1, largest=False, sorted=True).values
        return best

    def _distances(self, q, a: int, b: int):
        """Hamming distances int16 [Q, b - a] from the queries' words to rows a..b."""
        if self._fused is None:
            self._fused = self._try_fused(q, a, b)
        if self._fused:
            return self._fused(q, self._db[a:b])
        return torch_distances(q, self._db[a:b])

    def _try_fused(self, q, a: int, b: int):
        """The fused kernel if it builds and agrees with the torch count on this scan's first rows."""
        try:
            kernel = FusedHamming(self.device)
            probe = self._db[a:min(b, a + 4096)]
            agree = bool(self.torch.equal(kernel(q[:4], probe), torch_distances(q[:4], probe)))
        except Exception as e:  # noqa: BLE001 - any failure means: count with torch instead
            log.warning("torch-flat | the CuPy distance kernel is unavailable on %s (%s): counting with torch, "
                        "which is slower at large galleries", self.device, first_line(e))
            return False
        if not agree:
            log.warning("torch-flat | the CuPy distance kernel disagrees with torch's count on %s: not used",
                        self.device)
            return False
        log.info("torch-flat | distances on %s by the fused CuPy kernel", self.device)
        return kernel


def torch_distances(q, db):
    """Hamming distances int16 [Q, N] between query words int64 [Q, w] and code words [N, w]."""
    import torch

    x = torch.bitwise_xor(q[:, None, :], db[None, :, :])  # [Q, N, w]
    d = popcount64(x)
    del x
    d = d.sum(dim=2) if d.shape[2] > 1 else d[:, :, 0]
    return d.to(torch.int16)


def smallest_keys(d, k: int, offset: int, bits: int):
    """Keys `distance << ROW_BITS | (offset + row)` of the k nearest rows per query, ascending.

    d: distances [Q, N] in 0..bits (any integer dtype), 1 <= k <= N. Ties at the k-th distance go
    to the lower rows, as in FAISS's flat index. Exact, by a histogram of the distances (how many
    rows at each) rather than a sort or a select over N: every step is one pass over d, which a
    GPU spreads over all its cores (torch's kthvalue, by contrast, gives a query one block).
    """
    import torch

    n_q, n = d.shape
    if k >= n:
        rows = torch.arange(n, device=d.device).expand(n_q, n)
    else:
        span = bits + 1
        shifted = d.to(torch.int32) + torch.arange(0, n_q * span, span, dtype=torch.int32, device=d.device)[:, None]
        hist = torch.bincount(shifted.view(-1), minlength=n_q * span).view(n_q, span)
        del shifted
        cum = hist.cumsum(dim=1)
        t = (cum < k).sum(dim=1, keepdim=True).to(d.dtype)  # the k-th smallest distance per query
        below = d < t
        need = k - below.sum(dim=1, keepdim=True, dtype=torch.int32)  # >= 1: ties at t to take
        at = d == t
        take = below | (at & (at.cumsum(dim=1, dtype=torch.int32) <= need))
        del below, at
        # exactly k per query, and nonzero lists them query by query, rows ascending
        rows = take.nonzero()[:, 1].view(n_q, k)
        del take
    keys = (d.gather(1, rows).to(torch.int64) << ROW_BITS) + (rows + offset)
    return keys.sort(dim=1).values


class FusedHamming:
    """Hamming distances by one CuPy kernel over torch CUDA tensors (shared, not copied), on
    torch's current stream: __popcll of each 64-bit word's XOR, summed, as int16."""

    def __init__(self, device):
        import cupy as cp
        import torch

        self.cp = cp
        self.torch = torch
        self.device = device
        self.index = device.index if device.index is not None else self.torch.cuda.current_device()
        with cp.cuda.Device(self.index):
            self.kernel = cp.ElementwiseKernel(
                "raw int64 q, raw int64 db, int32 w, int64 n", "int16 d",
                """
                long long qi = i / n, j = i % n;
                int s = 0;
                for (int t = 0; t < w; ++t)
                    s += __popcll((unsigned long long)(q[qi * w + t] ^ db[j * w + t]));
                d = (short)s;
                """,
                "hashret_torch_flat_hamming",
            )

    def __call__(self, q, db):
        torch, cp = self.torch, self.cp
        q, db = q.contiguous(), db.contiguous()
        out = torch.empty((q.shape[0], db.shape[0]), dtype=torch.int16, device=self.device)
        if out.numel():
            stream = torch.cuda.current_stream(self.device)
            with cp.cuda.Device(self.index), cp.cuda.ExternalStream(stream.cuda_stream, self.index):
                self.kernel(cp.asarray(q), cp.asarray(db), np.int32(q.shape[1]), np.int64(db.shape[0]),
                            cp.asarray(out))
        return out


@index_kind("torch-flat")
class TorchFlatGallery(FaissGallery):
    """Exact brute-force Hamming search on a GPU (or any torch device), same results as faiss-flat."""

    summary = "exact search on a GPU with torch (same results and durability as faiss-flat; option --search-device)"
    CLI_OPTIONS = {
        "--search-device": ("device", dict(
            default=None, metavar="DEV",
            help="torch-flat only: the device its searches scan the codes on, cuda, cuda:N or cpu; a server may "
                 "override it with its own --search-device (default: cuda)")),
    }
    SEARCH_DEVICE = True  # open_gallery(search_device=...) may override the manifest's device
    # A CPU scan of up to 1 MiB of codes takes well under a millisecond; a CUDA search is a
    # synchronizing device call, which must never run on the server's event loop.
    CHEAP_SCAN_BYTES = 1 << 20

    def __init__(self, path: Path, manifest: dict[str, Any]):
        super().__init__(path, manifest)
        self._device_name = check_device(manifest["index"].get("device", DEFAULT_DEVICE),
                                         f"gallery {path} | index device")
        self._device = None  # resolved at open (refusing a missing GPU), never at create

    @classmethod
    def _check_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        options = dict(options)
        device = check_device(options.pop("device", DEFAULT_DEVICE))
        return {**super()._check_options(options), "device": device}

    @classmethod
    def open(cls, path: Path, manifest: dict[str, Any], search_device: str | None = None,
             read_only: bool = False) -> "TorchFlatGallery":
        """FaissGallery.open, after checking the device (the manifest's, or `search_device` instead).

        The override lives only in this process: the manifest, and so every snapshot, keeps the
        device the gallery was built for.
        """
        if search_device is None:
            name = check_device(manifest["index"].get("device", DEFAULT_DEVICE), f"gallery {path} | index device")
            device = resolve_device(name, f"gallery {path} | index device")
        else:
            name = check_device(search_device, "--search-device")
            device = resolve_device(name, "--search-device")
        g = super().open(path, manifest, read_only=read_only)
        g._device_name, g._device = name, device
        return g

    @property
    def search_device(self) -> str:
        """Where searches run (the manifest's device, or the override it was opened with)."""
        return self._device_name

    def _new_index(self):
        if self._device is None:  # a gallery being created: searched only after an open, normally
            self._device = resolve_device(self._device_name, f"gallery {self._path} | index device")
        return TorchFlatIndex(self._bits, self._device)

    def _ensure_index(self):
        if self._index is not None and self._index.broken:
            self._index = None
        index = super()._ensure_index()
        if index.broken:  # the device could not hold the codes
            self._index = None
            raise Unavailable(
                f"gallery {self._path} | {self._n} codes do not fit in the memory of {self._device_name}: "
                f"free the device, or serve the gallery with --search-device cpu"
            )
        return index

    def _cheap_index(self, n_queries, k):
        if self._device is None or self._device.type != "cpu":
            return False
        return n_queries * self._n * (self._bits // 8) <= self.CHEAP_SCAN_BYTES

    def _close(self) -> None:
        index, self._index = self._index, None
        if index is not None:
            index.release()
        super()._close()
