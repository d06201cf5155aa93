"""Exact Hamming search on a torch device ("torch-flat"): the FAISS gallery's storage, a GPU scan.

For galleries too large to scan on the CPU within a request's budget. Everything durable is
FaissGallery's, unchanged: codes, ids and metadata in memory in insertion order, the WAL, the
snapshots, the manifest and their checks (serve/gallery/faiss_index.py). Only the index differs:
`TorchFlatIndex` keeps a copy of the packed codes on the device and answers FAISS's
`add` / `search` calls with a brute-force popcount scan, so the gallery treats it exactly like
`IndexBinaryFlat` (built lazily, appended to on upsert, rebuilt after a replace or delete).

Results equal faiss-flat's item for item: distances are exact, and ties go to the lower row
(the item inserted first). The scan ranks by one int64 key per code, `distance << 40 | row`;
keys are distinct, so top-k over them has a single answer whatever order the selection visits
them in. Rows are scanned in chunks whose temporaries fit `CHUNK_BYTES`; a CUDA out-of-memory
error halves the chunk and retries, so a large batch of queries slows down instead of failing.

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

from hashret.errors import BadInput, Unavailable
from serve.gallery.base import index_kind
from serve.gallery.faiss_index import FaissGallery

log = logging.getLogger("hashret.gallery")

DEFAULT_DEVICE = "cuda"
ROW_BITS = 40  # rows per key: up to 2**40 codes; the distance sits above them
#: bytes of scan temporaries per chunk (the XOR words and two SWAR intermediates per code and query)
CHUNK_BYTES = 256 << 20
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


def _oom_errors() -> tuple[type[BaseException], ...]:
    import torch  # noqa: F401  (loaded, so its types are found)

    from hashret.engines.base import torch_oom_errors

    return torch_oom_errors()


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

    def __init__(self, bits: int, device, chunk_bytes: int = CHUNK_BYTES):
        import torch

        self.torch = torch
        self.d = int(bits)
        self.device = device
        self.nbytes = self.d // 8
        self.words = -(-self.nbytes // _WORD)
        self.ntotal = 0
        self.chunk_bytes = int(chunk_bytes)
        self._db = torch.zeros((0, self.words), dtype=torch.int64, device=device)
        self.broken = False  # an add failed (device memory): the gallery rebuilds before searching

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
        except _oom_errors() as e:
            # The write is already durable (WAL) and in the host arrays: never fail it for the device
            # copy. Free what this index holds; the next search rebuilds it, or reports the shortage.
            self.release()
            self.broken = True
            log.warning("torch-flat | out of device memory adding %d codes (%s): the index is rebuilt on the "
                        "next search", len(codes), str(e).splitlines()[0] if str(e) else type(e).__name__)

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
        # Temporaries per (query, code): the XOR words and two SWAR intermediates, 8 bytes each.
        per_row = 3 * self.words * _WORD * len(q)
        rows = max(k, self.chunk_bytes // per_row)
        while True:
            try:
                keys = self._scan(q, k, rows)
                break
            except _oom_errors():
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

    def _scan(self, q, k: int, rows: int):
        """The k smallest keys per query over all rows, `rows` codes at a time."""
        torch = self.torch
        best = None
        for a in range(0, self.ntotal, rows):
            b = min(self.ntotal, a + rows)
            x = torch.bitwise_xor(q[:, None, :], self._db[None, a:b, :])  # [Q, rows, words]
            d = popcount64(x)
            del x
            d = d.sum(dim=2) if self.words > 1 else d[:, :, 0]
            key = (d << ROW_BITS) + torch.arange(a, b, dtype=torch.int64, device=self.device)
            del d
            top = torch.topk(key, min(k, b - a), dim=1, largest=False, sorted=True).values
            best = top if best is None else torch.topk(
                torch.cat([best, top], dim=1), k, dim=1, largest=False, sorted=True).values
        return best


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
