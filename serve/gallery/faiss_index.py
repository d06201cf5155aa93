"""FAISS galleries: exact `IndexBinaryFlat` ("faiss-flat") and graph `IndexBinaryHNSW` ("faiss-hnsw").

The codes, ids and metadata live in memory (numpy + lists, in insertion order); the FAISS
index is derived from them and rebuilt lazily after a replace or delete (HNSW cannot
remove nodes). Durability comes from two pieces:

* a snapshot — `snapshot-<gen>.codes.npy`, `snapshot-<gen>.items.jsonl`, for a gallery that
  keeps activations `snapshot-<gen>.activations.npy` (float16 [N, bits], a NaN row for an item
  upserted by code), and for HNSW the serialized graph `snapshot-<gen>.index.faiss` — each
  written atomically, their sha256s recorded in manifest.json together with the last WAL
  sequence number they contain;
* `wal.jsonl`, an append-only log: every acknowledged upsert/delete is one line carrying
  its own CRC32, fsynced before the call returns (an upsert's activations, when the gallery
  keeps them, ride in the same line as base64 float16).

Opening refuses damage (ArtifactMismatch / MissingArtifact, exit code 2) and never repairs it by
deleting: each snapshot file must match its sha256, the manifest its checksum (which seals
`wal_seq`, size, generation, index options and the file list), each complete WAL line its CRC,
and the records must continue the snapshot's `wal_seq` one by one (`_replay`). The one repair is
a last line with no newline, a torn append never acknowledged: once everything else has loaded,
its bytes are moved to `wal.torn-<n>` and cut from the log.

`snapshot()` (also `save()`, and the server's background snapshots, serve/snapshots.py) bounds
the WAL. Under the lock it only copies the in-memory arrays and lists (20-50 ms at 1M items on
a busy 2-core host, benchmarks/snapshot_bench.py) and notes the WAL's length; serializing and writing the next
generation's files happen outside it, so searches and writes go on. Then the manifest (the
commit point), then the WAL is rewritten, atomically, to the records written since the copy
(seq > the snapshot's `wal_seq`), then the old generation is removed. A kill at any step
leaves either the old manifest + old files + full WAL, or the new manifest + a WAL whose
records up to `wal_seq` are skipped by sequence number: never a mix, nothing lost or applied
twice. Files of an unfinished generation are removed the next time the gallery opens.
HASHRET_SNAPSHOT_CRASH_AT=<step> (see CRASH_STEPS) SIGKILLs the process at that step: the
hook tests/test_snapshot.py uses to prove this.
"""
from __future__ import annotations

import base64
import fcntl
import hashlib
import io
import itertools
import json
import logging
import os
import signal
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hashret.errors import ArtifactMismatch, BadInput, MissingArtifact, Unavailable
from hashret.fsutil import atomic_write, fsync_dir, write_bytes_atomic
from hashret.manifest import gallery_checksum, now_iso, write_manifest
from hashret.metrics import rerank_order
from serve.gallery.base import REBUILD, Gallery, Hit, index_kind, new_gallery_manifest, short_sha

try:
    import faiss
except ImportError:  # a host without faiss (e.g. a stock GPU image) still serves the other index kinds
    class _NoFaiss:
        def __getattr__(self, name):
            raise Unavailable("index kinds faiss-flat/faiss-hnsw | faiss is not installed: "
                              "pip install faiss-cpu, or choose another --kind")

    faiss = _NoFaiss()

log = logging.getLogger("hashret.gallery")

WAL = "wal.jsonl"
TORN = "wal.torn"  # + "-<n>": torn last lines moved aside, never erased
LOCK = ".lock"
RESTORE = f"restore it or {REBUILD}"

CRASH_ENV = "HASHRET_SNAPSHOT_CRASH_AT"
#: where the test hook can kill a snapshot: "writing-*" die with the temp file written but not
#: yet renamed into place, "after-*" right after that step became durable
CRASH_STEPS = (
    "before-start", "writing-codes", "after-codes", "writing-items", "after-items", "writing-activations",
    "after-activations", "writing-index", "after-index", "after-manifest", "writing-wal", "after-wal",
    "after-cleanup",
)
_FILE_STEP = {".codes.npy": "codes", ".items.jsonl": "items", ".activations.npy": "activations",
              ".index.faiss": "index"}
_CHUNK_ITEMS = 1024  # items per piece of the items file (about 3 ms of encoding), GIL handed over between
_CHUNK_BYTES = 8 << 20  # bytes per piece of the HNSW graph


def _crash_point(step: str) -> None:
    """Test hook: SIGKILL this process at `step` of a snapshot when $HASHRET_SNAPSHOT_CRASH_AT names it.

    SIGKILL rather than an exception: nothing of ours (finally blocks, atexit, graceful shutdown)
    may run, exactly as with kill -9 or the OOM killer.
    """
    want = os.environ.get(CRASH_ENV)
    if not want:
        return
    if want not in CRASH_STEPS:
        raise BadInput(f"${CRASH_ENV} {want!r} | unknown snapshot step: use one of {', '.join(CRASH_STEPS)}")
    if want == step:
        log.warning("snapshot test hook: killing this process at step %s (%s)", step, CRASH_ENV)
        os.kill(os.getpid(), signal.SIGKILL)


def _iso_to_unix(text: Any) -> float | None:
    import datetime as _dt

    try:
        return _dt.datetime.fromisoformat(str(text)).timestamp()
    except (TypeError, ValueError):
        return None


@dataclass
class _WalScan:
    """What `_Wal.read` found: the records (with their line numbers) and a torn tail, if any."""

    records: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    end: int = 0  # bytes up to and including the last whole record
    torn: bytes = b""  # a last line with no newline and no whole record: never acknowledged
    torn_line: int = 0
    newline: bool = False  # the last record is whole but its newline is missing


class _Wal:
    """The append-only write-ahead log: one self-checking JSON line per acknowledged write."""

    def __init__(self, path: Path):
        self.path = path
        self._f = None
        self.size = 0  # bytes in the file; kept by append/reset/keep_after, re-read by refresh

    def refresh(self) -> None:
        """Re-read the file's length (after `repair`, which may cut a torn last line)."""
        try:
            self.size = self.path.stat().st_size
        except FileNotFoundError:
            self.size = 0

    @staticmethod
    def _body(rec: dict[str, Any]) -> str:
        return json.dumps(rec, sort_keys=True, separators=(",", ":"))

    def _encode(self, rec: dict[str, Any]) -> bytes:
        body = self._body(rec)
        return f'{{"crc":"{zlib.crc32(body.encode()):08x}","rec":{body}}}\n'.encode()

    def _decode(self, line: bytes) -> dict[str, Any] | None:
        try:
            obj = json.loads(line)
            rec = obj["rec"]
            ok = obj["crc"] == f"{zlib.crc32(self._body(rec).encode()):08x}"
        except (ValueError, KeyError, TypeError):
            return None
        return rec if ok and isinstance(rec, dict) else None

    def read(self) -> _WalScan:
        """Every record of the log, each checked against its CRC; the file is not changed.

        A damaged record is never dropped: a complete line (one ending in a newline was written
        and fsynced whole, so it may have been acknowledged) that fails its CRC or JSON refuses
        the gallery. Only a last line with no newline is a torn append, never acknowledged;
        `repair` moves it aside once the whole gallery has loaded.
        """
        if not self.path.is_file():
            raise MissingArtifact(
                f"gallery write-ahead log {self.path} | missing (every gallery has one, empty right after "
                f"a snapshot): restore it from a backup, or if nothing was written since the last snapshot "
                f"create it empty; else {REBUILD}"
            )
        data = self.path.read_bytes()
        scan = _WalScan()
        pos, lineno = 0, 0
        while pos < len(data):
            lineno += 1
            nl = data.find(b"\n", pos)
            if nl < 0:
                break
            rec = self._decode(data[pos:nl])
            if rec is None:
                raise self._corrupt(lineno, pos, "fails its CRC or is not valid JSON")
            scan.records.append((lineno, rec))
            pos = nl + 1
        scan.end = pos
        tail = data[pos:]
        if not tail:
            return scan
        rec = self._decode(tail)
        if rec is not None:  # every byte of the record but its newline: a crash right before it
            scan.records.append((lineno, rec))
            scan.end, scan.newline = len(data), True
        elif self._decode(tail[:-1]) is not None:  # a whole record, then a stray byte where "\n" was
            raise self._corrupt(lineno, pos, f"ends in byte 0x{tail[-1]:02x} instead of a newline")
        else:
            scan.torn, scan.torn_line = tail, lineno
        return scan

    def _corrupt(self, lineno: int, pos: int, what: str) -> ArtifactMismatch:
        return ArtifactMismatch(
            f"gallery write-ahead log {self.path} | line {lineno} is corrupt: it {what} (at byte {pos}). A "
            f"complete line may hold an acknowledged write, so nothing was changed: restore the file from a "
            f"backup or {REBUILD} (or, to give up this write and every later one, cut the file at byte {pos})"
        )

    def repair(self, scan: _WalScan) -> None:
        """After a successful load: move a torn last line aside, or end a whole last record's line.

        The torn bytes go to `wal.torn-<n>` (fsynced) before the log is cut back, so nothing read
        from disk is ever erased; the next append then starts on a clean line.
        """
        if scan.torn:
            taken = {p.name for p in self.path.parent.glob(f"{TORN}-*")}
            aside = self.path.with_name(next(f"{TORN}-{n}" for n in itertools.count(1) if f"{TORN}-{n}" not in taken))
            write_bytes_atomic(aside, scan.torn)
            with open(self.path, "r+b") as f:
                f.truncate(scan.end)
                f.flush()
                os.fsync(f.fileno())
            log.warning(
                "gallery write-ahead log %s | torn last line %d (%d bytes, no newline: a write interrupted "
                "by a crash before it was acknowledged) moved to %s", self.path, scan.torn_line,
                len(scan.torn), aside,
            )
        elif scan.newline:
            with open(self.path, "ab") as f:
                f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())
            log.warning(
                "gallery write-ahead log %s | last record (line %d) was whole but lacked its newline "
                "(a crash right before it was written): kept, newline added", self.path, scan.records[-1][0],
            )

    def append(self, rec: dict[str, Any]) -> None:
        line = self._encode(rec)
        if self._f is None:
            self._f = open(self.path, "ab")
        try:
            self._f.write(line)
            self._f.flush()
            os.fsync(self._f.fileno())
        except BaseException:
            # A failed append (disk full) is not acknowledged, but a partial line left in the file
            # would sit in front of the next record and make the whole log refuse to load.
            self.close()
            try:
                with open(self.path, "r+b") as f:
                    f.truncate(self.size)
                    os.fsync(f.fileno())
            except OSError:
                pass
            raise
        self.size += len(line)

    def reset(self) -> None:
        """Empty the log (atomically: a crash leaves the old one or an empty one)."""
        self.close()
        write_bytes_atomic(self.path, b"")
        self.size = 0

    def keep_after(self, offset: int) -> None:
        """Replace the log, atomically, by its bytes after `offset`: the records a snapshot lacks.

        Not simply emptied: writes go on while a snapshot is written, and theirs are the records
        after the offset noted when the snapshot copied the in-memory state.
        """
        self.close()
        try:
            with open(self.path, "rb") as f:
                f.seek(offset)
                tail = f.read()
        except FileNotFoundError:
            tail = b""

        def write(f) -> None:
            f.write(tail)
            f.flush()
            _crash_point("writing-wal")

        atomic_write(self.path, write)
        self.size = len(tail)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


@dataclass
class _Frozen:
    """The in-memory state as of WAL record `seq` (file offset `wal_offset`), copied for a snapshot."""

    gen: int
    seq: int
    wal_offset: int
    codes: np.ndarray
    ids: list[str]
    meta: list[dict[str, str]]
    acts: np.ndarray | None = None  # float16 [n, bits] when the gallery keeps activations
    index: Any = None  # kind-specific (HNSW: the serialized graph, when it was current)
    built: Any = None  # an index built from this copy outside the lock, offered back to the gallery


class FaissGallery(Gallery):
    """Shared machinery of both FAISS kinds; subclasses only build the index."""

    OPTIONS: dict[str, tuple[int, int, int]] = {}  # name -> (default, min, max)
    ACTIVATIONS = True
    READ_ONLY_OPEN = True

    def __init__(self, path: Path, manifest: dict[str, Any]):
        super().__init__(path, manifest)
        self._opts = {k: int(manifest["index"].get(k, d)) for k, (d, _, _) in self.OPTIONS.items()}
        self._buf = np.zeros((0, self.nbytes), np.uint8)  # capacity >= n; rows [:n] are live
        # float16 activations, same capacity and rows as _buf; kept only when has_activations
        self._zbuf = np.zeros((0, self._bits), np.float16)
        self._replay_acts: np.ndarray | None = None  # the activations of the WAL record being parsed
        self._n = 0
        self._ids_list: list[str] = []
        self._meta: list[dict[str, str]] = []
        self._pos: dict[str, int] = {}
        self._index = None  # None: stale, rebuilt on the next search
        self._wal = _Wal(self._path / WAL)
        self._seq = 0
        self._lockf = None
        # One snapshot at a time; taken before self._lock, never after it (close does the same).
        self._snap_lock = threading.Lock()
        self._snap_running = False
        self._snap_last: dict[str, Any] = {}

    # ---- kind hooks ---------------------------------------------------------------------
    def _new_index(self):
        raise NotImplementedError

    def _prepare_search(self, index, k: int) -> None:
        pass

    # ---- create / open --------------------------------------------------------------------
    @classmethod
    def _check_options(cls, options: dict[str, Any]) -> dict[str, int]:
        options = dict(options)
        activations = options.pop("activations", False)
        unknown = sorted(set(options) - set(cls.OPTIONS))
        if unknown:
            allowed = ", ".join(cls.OPTIONS) or "none"
            raise BadInput(f"index kind {cls.kind!r} | unknown option(s) {', '.join(unknown)}: allowed {allowed}")
        out = {}
        for name, (default, lo, hi) in cls.OPTIONS.items():
            v = options.get(name, default)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
                raise BadInput(f"index option {name}={v!r} | must be an integer in [{lo}, {hi}]")
            out[name] = int(v)
        if activations:
            out["activations"] = True
        return out

    @classmethod
    def create(cls, path: Path, bits: int, model_sha256: str, options: dict[str, Any]) -> "FaissGallery":
        opts = cls._check_options(options)
        manifest = new_gallery_manifest(bits, model_sha256, {"kind": cls.kind, **opts})
        manifest["snapshot"] = {"generation": -1, "wal_seq": 0, "files": {}}
        g = cls(path, manifest)
        g._lock_folder()
        try:
            # The WAL exists before the first manifest does, so a gallery without one is damaged.
            write_bytes_atomic(path / WAL, b"")
            g._save()  # generation 0: an empty snapshot, an empty WAL, then the manifest
        except BaseException:
            g._close()
            raise
        return g

    @classmethod
    def open(cls, path: Path, manifest: dict[str, Any], read_only: bool = False) -> "FaissGallery":
        """Load the live snapshot and replay the WAL after it.

        read_only: a shared lock (several readers, no writer), and nothing on disk is touched:
        a torn WAL tail is skipped, not cut, and leftovers of a killed snapshot stay for the next
        writer to remove. Writes and snapshots then raise ReadOnly.
        """
        g = cls(path, manifest)
        g._read_only = bool(read_only)
        g._lock_folder()
        try:
            g._load_snapshot()
            scan = g._replay()
            if read_only:
                if scan.torn or scan.newline:
                    log.warning("gallery %s | its WAL ends in an unfinished write (never acknowledged), "
                                "left in place: opened read-only, the next writer cuts it", path)
            else:
                g._wal.repair(scan)  # only now: a gallery refused above leaves every byte as it was
                g._wal.refresh()
                g._remove_leftovers()
        except BaseException:
            g._close()
            raise
        return g

    def _lock_folder(self) -> None:
        """One writer per folder, or any number of read-only openers: two processes appending to
        one WAL would corrupt it, and a reader must not see a writer's half-made snapshot."""
        shared = self._read_only
        mode = "r" if shared and (self._path / LOCK).exists() else "a+"
        self._lockf = open(self._path / LOCK, mode)
        try:
            fcntl.flock(self._lockf, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError:
            self._lockf.close()
            self._lockf = None
            holder = "a writer" if shared else ("another process or another open_gallery in this one; read-only "
                                                "openers such as hashret serve --workers count too")
            raise Unavailable(f"gallery {self._path} | already open ({holder}): close that first") from None

    def _load_snapshot(self) -> None:
        """The live generation's files, each checked against the sha256 the manifest seals.

        The manifest's own checksum (hashret.manifest.gallery_checksum, verified when it was
        read) covers the file list, generation, `wal_seq`, size and index options, so what is
        checked here is that the files hold exactly what the manifest says.
        """
        snap = self._manifest.get("snapshot")
        mpath = self._path / "manifest.json"
        try:
            files: dict[str, str] = dict(snap["files"])
            gen, wal_seq, size = int(snap["generation"]), int(snap["wal_seq"]), int(self._manifest["size"])
            if gen < 0 or wal_seq < 0 or size < 0:
                raise ValueError("negative")
        except (KeyError, TypeError, ValueError):
            raise ArtifactMismatch(
                f"gallery manifest {mpath} | no valid snapshot section (generation, wal_seq, files, size): "
                f"{RESTORE}"
            ) from None
        codes_name, items_name, index_name = self._names(gen)
        acts_name = self._acts_name(gen)
        needed = (codes_name, items_name) + ((acts_name,) if self.has_activations else ())
        lacking = [n for n in needed if n not in files]
        if lacking:
            raise ArtifactMismatch(f"gallery manifest {mpath} | generation {gen} lists no {lacking[0]}: {RESTORE}")
        data = {}
        for name, sha in files.items():
            p = self._path / name
            if not p.is_file():
                raise MissingArtifact(f"gallery snapshot {p} | missing: {RESTORE}")
            data[name] = p.read_bytes()
            got = hashlib.sha256(data[name]).hexdigest()
            if got != sha:
                raise ArtifactMismatch(
                    f"gallery snapshot {p} | sha256 {short_sha(got)} does not match the manifest's "
                    f"{short_sha(sha)} (truncated or modified): {RESTORE}"
                )
        try:
            codes = np.load(io.BytesIO(data[codes_name]), allow_pickle=False)
            items = [json.loads(line) for line in data[items_name].decode().splitlines()]
            ids = [it["id"] for it in items]
            meta = [it.get("meta") or {} for it in items]
            if not all(isinstance(i, str) and i for i in ids) or not all(
                isinstance(m, dict) and all(isinstance(a, str) and isinstance(b, str) for a, b in m.items())
                for m in meta
            ):
                raise ValueError("an id that is not a non-empty string, or metadata that is not str -> str")
            if len(set(ids)) != len(ids):
                raise ValueError("an id listed twice")
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactMismatch(f"gallery snapshot {self._path / items_name} | unreadable ({e}): {RESTORE}") from None
        if codes.dtype != np.uint8 or codes.shape != (len(items), self.nbytes):
            raise ArtifactMismatch(
                f"gallery snapshot {self._path / codes_name} | holds {codes.dtype}{list(codes.shape)}, "
                f"expected uint8[{len(items)}, {self.nbytes}]: {RESTORE}"
            )
        if len(items) != size:
            raise ArtifactMismatch(
                f"gallery snapshot {self._path / items_name} | holds {len(items)} items, manifest {mpath} "
                f"says {size}: {RESTORE}"
            )
        if self.has_activations:
            try:
                acts = np.load(io.BytesIO(data[acts_name]), allow_pickle=False)
            except ValueError as e:
                raise ArtifactMismatch(
                    f"gallery snapshot {self._path / acts_name} | unreadable ({e}): {RESTORE}"
                ) from None
            if acts.dtype != np.float16 or acts.shape != (len(items), self._bits):
                raise ArtifactMismatch(
                    f"gallery snapshot {self._path / acts_name} | holds {acts.dtype}{list(acts.shape)}, "
                    f"expected float16[{len(items)}, {self._bits}]: {RESTORE}"
                )
            self._zbuf = np.array(acts)
        self._buf, self._n = np.ascontiguousarray(codes), len(items)
        self._ids_list = ids
        self._meta = [dict(m) for m in meta]
        self._pos = {i: p for p, i in enumerate(self._ids_list)}
        if index_name in data:
            try:
                index = faiss.deserialize_index_binary(np.frombuffer(data[index_name], np.uint8).copy())
            except RuntimeError as e:
                raise ArtifactMismatch(
                    f"gallery snapshot {self._path / index_name} | not a FAISS binary index ({e}): {RESTORE}"
                ) from None
            self._index = index if index.ntotal == self._n and index.d == self._bits else None
        self._seq = wal_seq

    def _replay(self) -> _WalScan:
        """Apply the WAL's records after the snapshot's `wal_seq` (S), checking they continue it.

        Records carry consecutive seq numbers. Those <= S are already in the snapshot (a crash
        between a snapshot's manifest and its WAL rewrite leaves them): they are not applied, but
        what they wrote must be what the snapshot holds. The first record after S must be S+1, and
        a log that ends before S cannot be the one this snapshot was cut from. Anything else is not
        the acknowledged history and refuses the gallery.
        """
        scan = self._wal.read()
        snap_seq, prev = self._seq, None
        covered: dict[str, tuple[int, bytes | None, dict | None]] = {}  # id -> its last write <= S
        for lineno, rec in scan.records:
            seq = rec.get("seq")
            where = f"gallery write-ahead log {self._wal.path} | line {lineno}"
            if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
                raise ArtifactMismatch(f"{where} has no valid seq ({seq!r}): {RESTORE}")
            if prev is not None and seq != prev + 1:
                raise ArtifactMismatch(
                    f"{where} has seq {seq} after seq {prev}: records must be consecutive, so writes are missing "
                    f"or repeated; {RESTORE}"
                )
            if prev is None and seq > snap_seq + 1:
                gap = f"record {seq - 1} is" if seq - 1 == snap_seq + 1 else f"records {snap_seq + 1}..{seq - 1} are"
                raise ArtifactMismatch(
                    f"{where} starts at seq {seq}, but the snapshot in manifest {self._path / 'manifest.json'} "
                    f"ends at wal_seq {snap_seq}: {gap} missing; {RESTORE}"
                )
            prev = seq
            try:
                op, ids, codes, meta = self._parse_record(rec)
                if seq <= snap_seq:
                    for r, i in enumerate(ids):
                        covered[i] = (lineno, None, None) if op == "delete" else (lineno, codes[r].tobytes(), meta[r])
                    continue
                if covered:
                    self._check_covered(covered, snap_seq)
                    covered = {}
                self._apply(op, ids, codes, meta)
            except (KeyError, TypeError, ValueError, IndexError) as e:
                raise ArtifactMismatch(f"{where} (seq {seq}) is not a valid write ({e}): {RESTORE}") from None
            self._seq = seq
        if prev is not None and prev < snap_seq:
            raise ArtifactMismatch(
                f"gallery write-ahead log {self._wal.path} | ends at seq {prev}, but the snapshot in manifest "
                f"{self._path / 'manifest.json'} holds up to wal_seq {snap_seq}: the log or the manifest is from "
                f"another point in time; {RESTORE}"
            )
        self._check_covered(covered, snap_seq)
        return scan

    def _check_covered(self, covered: dict[str, tuple[int, bytes | None, dict | None]], snap_seq: int) -> None:
        """The snapshot holds what the skipped records (seq <= its wal_seq) last wrote to each id.

        Exact, not a heuristic: those records are a contiguous run of history ending at wal_seq,
        so an id's last write among them is its state in the snapshot. A wal_seq raised past
        writes the snapshot lacks (an edited manifest, sealed again) fails here.
        """
        for i, (lineno, code, meta) in covered.items():
            p = self._pos.get(i)
            if code is None and p is None:
                continue
            if code is not None and p is not None and self._buf[p].tobytes() == code and self._meta[p] == meta:
                continue
            raise ArtifactMismatch(
                f"gallery write-ahead log {self._wal.path} | line {lineno}'s write to id {i!r} has seq <= the "
                f"manifest's wal_seq {snap_seq}, so snapshot generation {self._manifest['snapshot']['generation']} "
                f"should hold it, and does not: the manifest {self._path / 'manifest.json'} or the snapshot is not "
                f"the one this log was cut from; {RESTORE}"
            )

    def _parse_record(self, rec: dict[str, Any]) -> tuple[str, list[str], np.ndarray | None, list | None]:
        """(op, ids, codes, metadata) of one WAL record, checked as strictly as the call that wrote it.

        An upsert's activations, when the record has them, are kept for `_apply` in
        `self._replay_acts` (the return shape stays that of every other record).
        """
        self._replay_acts = None
        op, ids = rec.get("op"), rec["ids"]
        if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids) or len(set(ids)) != len(ids):
            raise ValueError("ids must be distinct non-empty strings")
        if op == "delete":
            return op, ids, None, None
        if op != "upsert":
            raise ValueError(f"unknown op {op!r}")
        raw = base64.b64decode(rec["codes"], validate=True)
        meta = rec["meta"]
        if len(raw) != len(ids) * self.nbytes or not isinstance(meta, list) or len(meta) != len(ids):
            raise ValueError(f"{len(ids)} ids, {len(raw)} code bytes, {len(meta)} metadata entries")
        if not all(isinstance(m, dict) and all(isinstance(a, str) and isinstance(b, str) for a, b in m.items())
                   for m in meta):
            raise ValueError("metadata must be str -> str")
        if "acts" in rec:
            araw = base64.b64decode(rec["acts"], validate=True)
            if len(araw) != len(ids) * self._bits * 2:
                raise ValueError(f"{len(ids)} ids, {len(araw)} activation bytes")
            self._replay_acts = np.frombuffer(araw, np.float16).reshape(-1, self._bits)
        return op, ids, np.frombuffer(raw, np.uint8).reshape(-1, self.nbytes), meta

    def _apply(self, op: str, ids: list[str], codes: np.ndarray | None, meta: list | None) -> None:
        if op == "upsert":
            self._apply_upsert(ids, codes, meta, getattr(self, "_replay_acts", None))
            return
        missing = [i for i in ids if i not in self._pos]
        if missing:  # Gallery.delete refuses unknown ids before logging, so replay must find them
            raise ValueError(f"deletes id {missing[0]!r}, which is not in the gallery at that point")
        self._apply_delete(ids)

    # ---- in-memory state ------------------------------------------------------------------
    @property
    def _codes(self) -> np.ndarray:
        return self._buf[: self._n]

    def _apply_upsert(
        self, ids: list[str], codes: np.ndarray, meta: list[dict[str, str]], acts: np.ndarray | None = None
    ) -> None:
        keep_acts = self.has_activations
        if keep_acts and acts is None:  # written by code (or logged before activations): none
            acts = np.full((len(ids), self._bits), np.nan, np.float16)
        new_rows = [r for r, i in enumerate(ids) if i not in self._pos]
        for r, i in enumerate(ids):
            p = self._pos.get(i)
            if p is not None:  # replace in place: keeps its insertion order for ties
                self._buf[p] = codes[r]
                self._meta[p] = meta[r]
                if keep_acts:
                    self._zbuf[p] = acts[r]
                self._index = None
        if not new_rows:
            return
        need = self._n + len(new_rows)
        if need > len(self._buf):  # amortized growth, so streaming upserts stay O(1) each
            cap = max(need, 2 * len(self._buf), 1024)
            grown = np.zeros((cap, self.nbytes), np.uint8)
            grown[: self._n] = self._codes
            self._buf = grown
            if keep_acts:
                zgrown = np.full((cap, self._bits), np.nan, np.float16)
                zgrown[: self._n] = self._zbuf[: self._n]
                self._zbuf = zgrown
        added = codes[new_rows]
        self._buf[self._n : need] = added
        if keep_acts:
            self._zbuf[self._n : need] = acts[new_rows]
        for r in new_rows:
            self._pos[ids[r]] = len(self._ids_list)
            self._ids_list.append(ids[r])
            self._meta.append(meta[r])
        self._n = need
        if self._index is not None:
            self._index.add(added)

    def _apply_delete(self, ids: list[str]) -> None:
        if not ids:
            return
        keep = np.ones(self._n, bool)
        keep[[self._pos[i] for i in ids]] = False
        self._buf = np.ascontiguousarray(self._codes[keep])
        if self.has_activations:
            self._zbuf = np.ascontiguousarray(self._zbuf[: self._n][keep])
        self._n = len(self._buf)
        self._ids_list = [i for i, k in zip(self._ids_list, keep) if k]
        self._meta = [m for m, k in zip(self._meta, keep) if k]
        self._pos = {i: p for p, i in enumerate(self._ids_list)}
        self._index = None

    def _ensure_index(self):
        if self._index is None:
            index = self._new_index()
            if self._n:
                index.add(self._codes)
            self._index = index
        return self._index

    # ---- Gallery primitives -------------------------------------------------------------
    def _size(self) -> int:
        return self._n

    def _upsert(self, ids, codes, metadata, activations=None) -> None:
        rec = {"seq": self._seq + 1, "op": "upsert", "ids": ids,
               "codes": base64.b64encode(codes.tobytes()).decode(), "meta": metadata}
        if activations is not None and not np.isnan(activations).all():
            rec["acts"] = base64.b64encode(np.ascontiguousarray(activations, np.float16).tobytes()).decode()
        self._wal.append(rec)
        self._seq += 1
        self._apply_upsert(ids, codes, metadata, activations)

    def _missing(self, ids):
        return [i for i in ids if i not in self._pos]

    def _delete(self, ids) -> None:
        self._wal.append({"seq": self._seq + 1, "op": "delete", "ids": ids})
        self._seq += 1
        self._apply_delete(ids)

    def _scan(self, queries, k):
        """The index's raw (distances, labels) for the k nearest, k capped at the gallery size."""
        index = self._ensure_index()
        k = min(k, self._n)
        self._prepare_search(index, k)
        return index.search(queries, k)

    def _search(self, queries, k):
        dist, labels = self._scan(queries, k)
        out = []
        for drow, lrow in zip(dist, labels):
            # FAISS flat already orders ties by label (= insertion order); HNSW may not.
            pairs = sorted((int(d), int(p)) for d, p in zip(drow, lrow) if p >= 0)
            out.append([Hit(self._ids_list[p], d, dict(self._meta[p])) for d, p in pairs])
        return out

    def _search_reranked(self, queries, activations, k, r, max_distance):
        # A Hit with a copy of its metadata for each of the k * factor candidates cost more than
        # the search itself; the ranking is the one `_search` + rerank_order give (same ties).
        dist, labels = self._scan(queries, r)
        out = []
        for drow, lrow, qz in zip(dist, labels, activations):
            keep = lrow >= 0
            if max_distance is not None:
                keep &= drow <= max_distance
            d, p = drow[keep].astype(np.int64), lrow[keep].astype(np.int64)
            o = np.lexsort((p, d))  # by distance, ties by insertion order
            d, p = d[o], p[o]
            order, scores = rerank_order(d, qz, self._zbuf[p])
            top = order[:k]
            out.append([Hit(self._ids_list[pi], di, dict(self._meta[pi]), sc)
                        for pi, di, sc in zip(p[top].tolist(), d[top].tolist(), scores[:k].tolist())])
        return out

    def _cheap(self, n_queries, k):
        return self._index is not None and self._cheap_index(n_queries, k)

    def _cheap_index(self, n_queries: int, k: int) -> bool:
        return False

    def _activations_of(self, results):
        return [self._zbuf[[self._pos[h.id] for h in hits]] if hits else np.zeros((0, self._bits), np.float16)
                for hits in results]

    def _get(self, id):
        p = self._pos.get(id)
        return None if p is None else (self._buf[p].copy(), dict(self._meta[p]))

    def _ids(self):
        return list(self._ids_list)

    def _names(self, gen: int) -> tuple[str, str, str]:
        stem = f"snapshot-{gen:06d}"
        return f"{stem}.codes.npy", f"{stem}.items.jsonl", f"{stem}.index.faiss"

    def _acts_name(self, gen: int) -> str:
        return f"snapshot-{gen:06d}.activations.npy"

    # ---- snapshots ------------------------------------------------------------------------
    def _freeze(self) -> "_Frozen":
        """Copy of the in-memory state at the WAL's current end (lock held: this is all writes wait for).

        Copies, not references: deletes swap the arrays, but replaces write rows and list
        slots in place. The metadata dicts themselves are never mutated, so the list copy is shallow.
        """
        n = self._n
        return _Frozen(
            gen=int(self._manifest["snapshot"]["generation"]) + 1, seq=self._seq, wal_offset=self._wal.size,
            codes=self._buf[:n].copy(), ids=self._ids_list[:], meta=self._meta[:], index=self._freeze_index(),
            acts=self._zbuf[:n].copy() if self.has_activations else None,
        )

    def _freeze_index(self) -> Any:
        """Kind hook: what of the FAISS index the snapshot stores, taken under the lock."""
        return None

    def _snapshot_blobs(self, frozen: "_Frozen") -> dict[str, list]:
        """Each file's bytes as a list of chunks (bytes or memoryviews).

        Chunks, not one bytes object: joining, encoding or copying hundreds of MB is one C call
        that holds the GIL throughout, and searches and writes would stall behind it.
        """
        codes_name, items_name, _ = self._names(frozen.gen)
        bio = io.BytesIO()
        np.save(bio, frozen.codes, allow_pickle=False)
        # The same text as json.dumps({"id": i, "meta": m}) per line, 1.8x faster (measured at 200k
        # items): this loop holds the GIL, so it is what searches and writes feel during a snapshot.
        dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
        quote = json.encoder.encode_basestring
        ids, meta, step = frozen.ids, frozen.meta, _CHUNK_ITEMS
        items = []
        for a in range(0, len(ids), step):
            items.append("".join(['{"id":' + quote(i) + ',"meta":' + dumps(m) + "}\n"
                                  for i, m in zip(ids[a : a + step], meta[a : a + step])]).encode())
            # Hand the GIL over now: a waiting search or write would otherwise get it only at the
            # next forced switch (5 ms), once per GIL acquisition it makes.
            time.sleep(0)
        blobs = {codes_name: [bio.getvalue()], items_name: items}
        if frozen.acts is not None:
            abio = io.BytesIO()
            np.save(abio, frozen.acts, allow_pickle=False)
            blobs[self._acts_name(frozen.gen)] = [abio.getvalue()]
        return blobs

    def _write_snapshot_file(self, name: str, chunks: list) -> str:
        step = next(s for suffix, s in _FILE_STEP.items() if name.endswith(suffix))
        h = hashlib.sha256()

        def write(f) -> None:
            for c in chunks:
                f.write(c)
                h.update(c)
            f.flush()
            _crash_point(f"writing-{step}")

        atomic_write(self._path / name, write)  # fsync of the file, rename, fsync of the folder
        _crash_point(f"after-{step}")
        return h.hexdigest()

    def snapshot(self) -> dict[str, Any]:
        """Write the next snapshot generation and cut the WAL back to what came after it.

        Searches and writes wait only while the state is copied (`copy_ms` in the result); the
        new generation becomes live once its files and the manifest are durable, then the WAL
        is rewritten to the records written meanwhile. Returns timings and sizes.
        """
        with self._snap_lock:
            t0 = time.perf_counter()
            with self._lock:
                self._check_writable("snapshot")
                _crash_point("before-start")
                frozen = self._freeze()
                wal_before = {"records": self._wal_records(), "bytes": self._wal.size}
            copied = time.perf_counter()
            self._snap_running = True
            try:
                return self._write_generation(frozen, wal_before, t0, copied)
            finally:
                self._snap_running = False

    def _write_generation(self, frozen: "_Frozen", wal_before: dict, t0: float, copied: float) -> dict[str, Any]:
        blobs = self._snapshot_blobs(frozen)
        serialized = time.perf_counter()
        files: dict[str, str] = {}
        try:
            for name, blob in blobs.items():
                files[name] = self._write_snapshot_file(name, blob)
            manifest = dict(self._manifest)
            manifest.update(
                size=len(frozen.ids), saved=now_iso(),
                snapshot={"generation": frozen.gen, "wal_seq": frozen.seq, "files": files},
            )
            manifest["checksum"] = gallery_checksum(manifest)  # last: it seals the fields above
            write_manifest(self._path, manifest)  # the commit point: durable file, then folder
        except BaseException as e:
            for name in blobs:  # never live: the old generation and the full WAL still are
                (self._path / name).unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise Unavailable(
                    f"gallery {self._path} | snapshot generation {frozen.gen} could not be written "
                    f"({e.strerror or e}): free disk space or fix permissions; generation "
                    f"{frozen.gen - 1} and the WAL still hold every write"
                ) from None
            raise
        _crash_point("after-manifest")
        written = time.perf_counter()
        with self._lock:
            self._manifest = manifest
            if frozen.built is not None and self._index is None and self._seq == frozen.seq:
                self._index = frozen.built  # nothing changed since the copy: save rebuilding it
            self._wal.keep_after(frozen.wal_offset)
            _crash_point("after-wal")
            wal_after = {"records": self._wal_records(), "bytes": self._wal.size}
        rewritten = time.perf_counter()
        for p in self._path.glob("snapshot-*"):
            if p.name not in files:
                p.unlink(missing_ok=True)
        _crash_point("after-cleanup")
        done = time.perf_counter()
        result = {
            "generation": frozen.gen, "items": len(frozen.ids), "wal_seq": frozen.seq,
            "bytes": sum(len(c) for chunks in blobs.values() for c in chunks), "wal_before": wal_before, "wal_after": wal_after,
            "copy_ms": round((copied - t0) * 1e3, 3), "serialize_s": round(serialized - copied, 4),
            "write_s": round(written - serialized, 4), "wal_rewrite_ms": round((rewritten - written) * 1e3, 3),
            "total_s": round(done - t0, 4),
        }
        self._snap_last = {**result, "unix": time.time()}
        log.info(
            "gallery %s | snapshot generation %d: %d items, WAL %d records/%d bytes -> %d/%d, %.2f s "
            "(writes waited %.1f ms)", self._path, frozen.gen, len(frozen.ids), wal_before["records"],
            wal_before["bytes"], wal_after["records"], wal_after["bytes"], result["total_s"], result["copy_ms"],
            extra={"fields": {"snapshot": result}},
        )
        return result

    def _wal_records(self) -> int:
        return max(0, self._seq - int(self._manifest["snapshot"].get("wal_seq", 0)))

    def wal_stats(self) -> dict[str, Any] | None:
        """WAL records and bytes since the last snapshot, and when that was (no lock: plain reads).

        None when read-only: this process writes no log, so it has none to bound.
        """
        if self._read_only:
            return None
        m = self._manifest
        last = self._snap_last
        return {
            "records": self._wal_records(),
            "bytes": self._wal.size,
            "last_snapshot": m.get("saved"),
            "last_snapshot_unix": last.get("unix") or _iso_to_unix(m.get("saved")),
            "generation": int(m["snapshot"].get("generation", 0)),
            "running": self._snap_running,
        }

    def save(self) -> None:
        """A snapshot (see `snapshot`): the gallery reopens without replaying the WAL."""
        self.snapshot()

    def _save(self) -> None:
        self.snapshot()

    def _remove_leftovers(self) -> None:
        """Delete what a killed snapshot left: files of a generation that is not the live one, temp files."""
        live = set(self._manifest["snapshot"]["files"])
        temp = (".snapshot-", f".{WAL}.", ".manifest.json.")
        junk = sorted(
            p for p in self._path.iterdir()
            if (p.name.startswith("snapshot-") and p.name not in live)
            or (p.name.startswith(temp) and p.name.endswith(".tmp"))
        )
        if not junk:
            return
        for p in junk:
            p.unlink(missing_ok=True)
        fsync_dir(self._path)
        log.warning(
            "gallery %s | removed %d file(s) of an unfinished or replaced snapshot (a crash during a "
            "snapshot; generation %s is live): %s", self._path, len(junk),
            self._manifest["snapshot"].get("generation"), ", ".join(p.name for p in junk),
        )

    def close(self) -> None:
        with self._snap_lock:  # a snapshot in progress completes first
            super().close()

    def _close(self) -> None:
        self._wal.close()
        if self._lockf is not None:
            self._lockf.close()  # releases the flock
            self._lockf = None


def flat_index(bits: int):
    """`IndexBinaryFlat` with counting k-selection (`use_heap=False`).

    FAISS keeps the k best in a heap by default; with codes of at most a few hundred bits the
    distances are small integers, and its alternative counts candidates per distance instead.
    Both are exact and order ties by label (tests/test_gallery.py checks against brute force);
    counting measured 0.91 vs 1.20 ms per query over 1M 64-bit codes on one core here.
    """
    index = faiss.IndexBinaryFlat(bits)
    index.use_heap = False
    return index


@index_kind("faiss-flat")
class FaissFlatGallery(FaissGallery):
    """Exact brute-force Hamming search (popcount over all codes): the default."""

    summary = "exact FAISS search over all codes"

    # A scan touches every code: ~0.9 ms per 8 MB here, so up to 1 MiB per call is "cheap".
    CHEAP_SCAN_BYTES = 1 << 20

    def _new_index(self):
        return flat_index(self._bits)

    def _cheap_index(self, n_queries, k):
        return n_queries * self._n * (self._bits // 8) <= self.CHEAP_SCAN_BYTES


@index_kind("faiss-hnsw")
class FaissHNSWGallery(FaissGallery):
    """Approximate graph search for large galleries; the graph is saved in the snapshot."""

    summary = "approximate FAISS HNSW graph search"
    OPTIONS = {"M": (32, 4, 256), "ef_construction": (64, 8, 4096), "ef_search": (64, 1, 1 << 16)}

    def _new_index(self):
        index = faiss.IndexBinaryHNSW(self._bits, self._opts["M"])
        index.hnsw.efConstruction = self._opts["ef_construction"]
        return index

    def _prepare_search(self, index, k: int) -> None:
        index.hnsw.efSearch = max(self._opts["ef_search"], k)

    def _cheap_index(self, n_queries, k):
        # efSearch 256 over 1M codes measured 0.3 ms per query here; wider searches go to a thread
        return n_queries * max(self._opts["ef_search"], k) <= 256

    def _freeze_index(self):
        # Every add rewires neighbours, so the graph cannot be read while writes go on: it is
        # copied with the rest (one memcpy-like pass; measured in benchmarks/snapshot_bench.py).
        return None if self._index is None else faiss.serialize_index_binary(self._index)

    def _snapshot_blobs(self, frozen: _Frozen) -> dict[str, list]:
        blobs = super()._snapshot_blobs(frozen)
        graph = frozen.index
        if graph is None:  # stale after a replace or delete: built from the copy, outside the lock
            index = self._new_index()
            if len(frozen.codes):
                index.add(frozen.codes)
            frozen.built = index
            graph = faiss.serialize_index_binary(index)
        view = memoryview(graph)  # no copy: written in slices (see FaissGallery._snapshot_blobs)
        blobs[self._names(frozen.gen)[2]] = [view[a : a + _CHUNK_BYTES] for a in range(0, len(view), _CHUNK_BYTES)]
        return blobs
