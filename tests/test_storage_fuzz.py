"""Storage fuzzer: damage a gallery on disk, one mutation at a time, and open it again.

A gallery is built like `hashret index build` does, then written through the real server
(Upserts and Deletes, each acknowledged), in two server runs: the first stops gracefully (its
shutdown snapshot makes a new generation), the second is where the folder is taken:

* "crash": a copy of the folder while the second server still runs, every write acknowledged:
  byte for byte what kill -9 at that moment leaves (snapshot + a WAL of the later writes);
* "crash-in-snapshot": the second server's shutdown snapshot killed right after its manifest, the
  commit point, became durable (HASHRET_SNAPSHOT_CRASH_AT=after-manifest): two generations on
  disk and a WAL whose records the new snapshot already holds.

Then, for every file of the folder: delete it; flip one bit (seeded) at byte offsets; truncate
it at byte offsets. Each mutated folder is opened in-process (serve.gallery.open_gallery, what
`hashret serve` calls) and must end in exactly one of two ways:

* refused: a HashretError with exit code 2 whose message names the mutated file, and not one
  byte of the folder changed by the attempt; or
* served, and its content (ids in order, codes, metadata) equals the acknowledged state, computed
  here from the calls made, not read back from the gallery.

One case is neither, and is reported apart: cutting wal.jsonl short. A log whose tail is gone is
what a crash leaves before those writes were acknowledged (a torn last line is moved aside to
wal.torn-<n>; a cut at a record boundary leaves no trace at all), so an append-only log cannot
tell the two apart without a second durable write per call. For those mutations the test asserts
the gallery serves exactly the acknowledged state as of the last whole record left, or refuses.

CI runs CI_MUTATIONS mutations per state, seeded: every file deleted once, every byte of the WAL's
last line and of the manifest's "generation" and "wal_seq" entries flipped and cut, and a sample
of the other offsets. HASHRET_FUZZ_MUTATIONS=N runs N per state instead; once N reaches the number
of offsets (12000 does here) every offset of every file under 4 KB is flipped and cut. A sample is
also replayed against the real server process (exit code 2, the file named on its error line).
The Milvus Lite gallery gets the same treatment (N/3 mutations) for the one file of it that is
ours, manifest.json. The mutated folders live on tmpfs when there is one (see fast_scratch).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from benchmarks.soak import ServerProcess
from hashret.errors import HashretError
from tests.test_fuzz import BITS, build_gallery, shared_exp

TOKEN = "fuzz-token-7"
SERVER_ARGS = ["--log-format", "text", "--engine-threads", "1", "--decode-threads", "1"]
FUZZ_ENV = "HASHRET_FUZZ_MUTATIONS"
CI_MUTATIONS = 1500  # per FAISS state
SMALL = 4096  # files under this size get every offset once the budget allows it
NBYTES = BITS // 8
N_BASE = 8


def budget() -> int:
    raw = os.environ.get(FUZZ_ENV)
    if raw is None:
        return CI_MUTATIONS
    try:
        n = int(raw)
    except ValueError:
        n = -1
    if n < 1:
        raise pytest.UsageError(f"${FUZZ_ENV} {raw!r} | not a positive number of mutations: e.g. {FUZZ_ENV}=5000")
    return n


# ---- the acknowledged state, modelled here from the calls made ------------------------------
def code(rng: random.Random) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(NBYTES))


def write_plan(seed: int = 5) -> tuple[list, list]:
    """Two server runs of Upserts (id, code, metadata) and Deletes, touching every path of replay."""
    rng = random.Random(seed)
    run1 = [
        ("upsert", [("new/a", code(rng), {"k": "a"}), ("new/b", code(rng), {"k": "b", "ü": "Äpfel \"quoted\""})]),
        ("delete", ["item/003"]),
        ("upsert", [("item/005", code(rng), {"n": "5", "v": "2"})]),  # replaced in place
        ("upsert", [("new/c", code(rng), {})]),
    ]
    run2 = [
        ("upsert", [(f"w/{i}", code(rng), {"i": str(i)}) for i in range(1, 4)]),
        ("delete", ["new/a", "item/000"]),
        ("upsert", [("item/003", code(rng), {"back": "yes"})]),  # deleted in run 1: back, at the end
        ("upsert", [("w/2", code(rng), {"i": "2", "v": "2"}), ("w/9", code(rng), {"i": "9"})]),
        ("delete", ["w/3"]),
        ("upsert", [("id with spaces/ü.jpg", code(rng), {"path": "a b/ü.jpg", "label": "7"})]),
        ("upsert", [("w/1", code(rng), {"i": "1", "v": "3"})]),
    ]
    return run1, run2


def apply_op(state: dict, op) -> None:
    kind, payload = op
    if kind == "upsert":
        for i, c, md in payload:
            state[i] = (c, md)  # an existing key keeps its place, as a replace does
    else:
        for i in payload:
            del state[i]


def contents(g) -> list[tuple[str, bytes, dict]]:
    out = []
    for i in g.ids():
        c, md = g.get(i)
        out.append((i, c.tobytes(), md))
    return out


def activations(g) -> bytes:
    """Every item's stored activations (the snapshot's .activations.npy plus the WAL's), as bytes."""
    return g.stored_activations().tobytes()


def as_list(state: dict) -> list[tuple[str, bytes, dict]]:
    return [(i, c, md) for i, (c, md) in state.items()]


# ---- the gallery, written through the real server -------------------------------------------
def send(stub, op) -> None:
    from serve._proto import retrieval_pb2 as pb

    auth = (("authorization", f"Bearer {TOKEN}"),)
    kind, payload = op
    if kind == "upsert":
        items = [pb.UpsertItem(id=i, code=c, metadata=md) for i, c, md in payload]
        r = stub.Upsert(iter(items), timeout=30, metadata=auth)
    else:
        r = stub.Delete(pb.DeleteRequest(ids=payload), timeout=30, metadata=auth)
    assert r.count == len(payload)  # acknowledged


@dataclass
class State:
    """One gallery folder to fuzz and what it must serve."""

    name: str
    path: Path
    files: dict[str, bytes]  # the folder as left, relative name -> bytes
    final: list  # the acknowledged content
    snap_seq: int  # the live manifest's wal_seq
    at_seq: dict[int, list]  # WAL seq -> acknowledged content after that record
    acts: bytes | None = None  # the stored activations of `final`, when the gallery keeps them


@pytest.fixture(scope="module")
def exp(tmp_path_factory) -> Path:
    return shared_exp(tmp_path_factory)


@pytest.fixture(scope="module")
def states(exp, tmp_path_factory):
    from serve._proto import retrieval_pb2_grpc as pb_grpc
    from serve.gallery import open_gallery

    root = tmp_path_factory.mktemp("storage-fuzz")
    gal = build_gallery(exp, root / "gal", n=N_BASE)
    with open_gallery(gal) as g:  # what `index build` acknowledged
        assert g.has_activations  # so the fuzz covers the activations file too
        state = {i: (c, md) for i, c, md in contents(g)}
        base_seq = int(g.manifest["snapshot"]["wal_seq"])
    run1, run2 = write_plan()
    ops = run1 + run2
    at_seq = {base_seq: as_list(state)}
    for k, op in enumerate(ops, 1):
        apply_op(state, op)
        at_seq[base_seq + k] = as_list(state)

    def run(ops, env=None):
        srv = ServerProcess(exp, gal, SERVER_ARGS, token=TOKEN, env=env).start()
        try:
            with grpc.insecure_channel(srv.addr) as ch:
                stub = pb_grpc.RetrievalStub(ch)
                for op in ops:
                    send(stub, op)
        except BaseException:
            srv.cleanup()
            raise
        return srv

    srv = run(run1)
    assert srv.stop() == 0, srv.log_text()[-3000:]  # graceful: the shutdown snapshot
    srv.cleanup()
    srv = run(run2, env={"HASHRET_SNAPSHOT_CRASH_AT": "after-manifest"})
    try:
        crash = root / "crash"
        shutil.copytree(gal, crash)  # every write acknowledged and fsynced: what kill -9 now leaves
        code_ = srv.stop()
        assert code_ == -9, f"exit {code_}: the snapshot crash hook did not fire\n{srv.log_text()[-3000:]}"
    finally:
        srv.cleanup()
    out = {}
    scratch = fast_scratch(root)
    for name, src in (("crash", crash), ("crash-in-snapshot", gal)):
        path = scratch / name
        shutil.copytree(src, path)
        files = {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}
        m = json.loads(files["manifest.json"])
        out[name] = State(name, path, files, at_seq[base_seq + len(ops)], int(m["snapshot"]["wal_seq"]), at_seq)
        with open_gallery(path) as g:
            out[name].acts = activations(g)
        restore(path, files)
    assert out["crash"].snap_seq == base_seq + len(run1)
    assert out["crash-in-snapshot"].snap_seq == base_seq + len(ops)
    assert len(out["crash-in-snapshot"].files) > len(out["crash"].files)  # both generations are there
    yield out
    if scratch != root:
        shutil.rmtree(scratch, ignore_errors=True)


def fast_scratch(fallback: Path) -> Path:
    """A folder on tmpfs when there is one: every successful open fsyncs (repairs, leftover
    removal), which on a busy disk costs more than the rest of a mutation; durability is not
    what this test measures, the bytes read back are."""
    import tempfile

    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix="hashret-storage-fuzz-", dir=shm))
    return fallback


# ---- mutations ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mutation:
    file: str
    how: str  # "flip" | "truncate" | "delete"
    offset: int = 0
    bit: int = 0

    def __str__(self) -> str:
        if self.how == "delete":
            return f"delete {self.file}"
        what = f"flip bit {self.bit} of byte" if self.how == "flip" else "truncate at byte"
        return f"{what} {self.offset} of {self.file}"

    def apply(self, folder: Path) -> None:
        p = folder / self.file
        if self.how == "delete":
            p.unlink()
            return
        b = bytearray(p.read_bytes())
        if self.how == "flip":
            b[self.offset] ^= 1 << self.bit
        else:
            del b[self.offset :]
        p.write_bytes(bytes(b))


def plan(files: dict[str, bytes], n: int, seed: int, focus: dict[str, list[int]]) -> list[Mutation]:
    """n mutations: each file deleted once, the `focus` byte ranges flipped and cut, a seeded sample of the rest.

    With n at least the number of offsets, every offset of every file under SMALL bytes is flipped
    and cut, and a sample of the larger files' offsets.
    """
    rng = random.Random(seed)
    muts = [Mutation(f, "delete") for f in files]
    chosen: set[tuple[str, str, int]] = set()

    def add(f: str, how: str, o: int) -> None:
        if (f, how, o) not in chosen:  # one mutation per (file, kind, offset): a flip takes a seeded bit
            chosen.add((f, how, o))
            muts.append(Mutation(f, how, o, rng.randrange(8) if how == "flip" else 0))

    for f, span in focus.items():
        for o in span:
            add(f, "flip", o)
            add(f, "truncate", o)
    pool = [(f, h, o) for f, b in files.items() for h in ("flip", "truncate") for o in range(len(b))]
    pool = [x for x in pool if x not in chosen]
    small = [x for x in pool if len(files[x[0]]) < SMALL]
    large = [x for x in pool if len(files[x[0]]) >= SMALL]
    rest = max(0, n - len(muts))
    picks = rng.sample(small, min(rest, len(small)))
    picks += rng.sample(large, min(max(0, rest - len(picks)), len(large)))
    for x in picks:
        add(*x)
    return muts


def restore(folder: Path, files: dict[str, bytes], prune: bool = True) -> None:
    """Put `files` back as they were; with `prune`, also remove every other file (wal.torn-<n>...)."""
    for p in folder.iterdir() if prune else ():
        if p.name not in files:
            p.unlink()
    for name, data in files.items():
        p = folder / name
        if not p.is_file() or p.read_bytes() != data:
            p.write_bytes(data)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def wal_lines(wal: bytes) -> list[tuple[int, int]]:
    """(end offset after the newline, seq) of each record of an intact WAL."""
    out, pos = [], 0
    for line in wal.splitlines(keepends=True):
        pos += len(line)
        out.append((pos, json.loads(line)["rec"]["seq"]))
    return out


def expected_after_cut(st: State, offset: int) -> list | None:
    """What a WAL cut at `offset` must serve (None: it must refuse): the state after the last whole record.

    A cut that only drops the final newline leaves a whole record, which is kept.
    """
    kept = [seq for end, seq in wal_lines(st.files["wal.jsonl"]) if end - 1 <= offset]
    if kept and kept[-1] < st.snap_seq:
        return None  # the log no longer reaches the snapshot it was cut from
    return st.at_seq[max([st.snap_seq, *kept])]


@dataclass
class Result:
    mutation: Mutation
    outcome: str  # "refused" | "equal" | "wal-cut" | a failure description
    message: str = ""


def attempt(st: State, m: Mutation) -> Result:
    """Mutate the folder, open it, classify, restore the folder."""
    from serve.gallery import open_gallery

    folder = st.path
    m.apply(folder)
    try:
        mutated = folder_bytes(folder)
        try:
            g = open_gallery(folder)
        except HashretError as e:
            msg = str(e)
            if e.exit_code != 2:
                return Result(m, f"FAIL refused with exit code {e.exit_code}", msg)
            if m.file not in msg:
                return Result(m, "FAIL refusal does not name the file", msg)
            if folder_bytes(folder) != mutated:
                return Result(m, "FAIL refused but changed the folder", msg)
            return Result(m, "refused", msg)
        except Exception as e:  # noqa: BLE001 - anything else is a crash, not a refusal
            return Result(m, f"FAIL {type(e).__name__} instead of a refusal", str(e))
        try:
            got = contents(g)
            acts = activations(g) if st.acts is not None else None
        finally:
            g.close()
        if got == st.final and acts != st.acts:
            return Result(m, "FAIL served other activations than were acknowledged")
        if got == st.final:
            return Result(m, "equal")
        if m.file == "wal.jsonl" and m.how == "truncate":
            want = expected_after_cut(st, m.offset)
            if want is None:
                return Result(m, "FAIL served a WAL that no longer reaches its snapshot")
            if got != want:
                return Result(m, "FAIL a cut WAL served other than its whole records")
            ends = [e for e, _ in wal_lines(st.files["wal.jsonl"])]
            whole = max([0, *[e for e in ends if e <= m.offset]])
            torn = b"" if m.offset + 1 in ends else st.files["wal.jsonl"][whole : m.offset]
            aside = folder / "wal.torn-1"
            if torn and (not aside.is_file() or aside.read_bytes() != torn):
                return Result(m, "FAIL the torn bytes were not moved to wal.torn-1")
            return Result(m, "wal-cut")
        return Result(m, "FAIL served content other than the acknowledged state")
    finally:
        restore(folder, st.files)


def focus_ranges(st: State) -> dict[str, list[int]]:
    """Always covered: every byte of the last WAL line with its newline (the reproduction of
    issue 15), and the manifest's "generation" and "wal_seq" entries."""
    wal = st.files["wal.jsonl"]
    last = wal.rstrip(b"\n").rfind(b"\n") + 1
    text = st.files["manifest.json"]
    keys = [text.find(k) for k in (b'"generation"', b'"wal_seq"')]
    manifest = [o for k in keys for o in range(k, text.find(b",", k) + 1)]
    return {"wal.jsonl": list(range(last, len(wal))), "manifest.json": manifest}


def report(name: str, results: list[Result]) -> str:
    by = Counter((r.mutation.file, r.mutation.how, r.outcome.split(" ")[0]) for r in results)
    outcomes = Counter(r.outcome.split(" ")[0] for r in results)
    lines = [f"storage fuzz [{name}]: {len(results)} mutations: "
             + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))]
    for (f, how, out), n in sorted(by.items()):
        lines.append(f"  {f:32s} {how:8s} {out:8s} {n}")
    return "\n".join(lines)


@pytest.mark.parametrize("name", ["crash", "crash-in-snapshot"])
def test_every_damaged_byte_is_refused_or_harmless(states, name):
    from serve.gallery import open_gallery

    st = states[name]
    with open_gallery(st.path) as g:  # the undamaged folder serves exactly what was acknowledged
        assert contents(g) == st.final
    restore(st.path, st.files)
    muts = plan(st.files, budget(), seed=15, focus=focus_ranges(st))
    results = [attempt(st, m) for m in muts]
    print("\n" + report(name, results))
    failed = [r for r in results if r.outcome.startswith("FAIL")]
    assert not failed, "\n".join(f"{r.mutation}: {r.outcome}: {r.message[:300]}" for r in failed[:20])
    assert len(results) >= min(500, budget())
    outcomes = Counter(r.outcome for r in results)
    # both outcomes really happen: a fuzzer that only ever saw refusals would prove nothing
    assert outcomes["refused"] and outcomes["equal"], outcomes
    if name == "crash":
        # a torn last line (a crash mid-append) is served without it, not refused
        cut = [r for r in results if r.mutation.file == "wal.jsonl" and r.mutation.how == "truncate"]
        assert any(r.outcome == "wal-cut" for r in cut), Counter(r.outcome for r in cut)
    else:
        # the log holds only records the snapshot has: any cut that drops one is refused
        assert all(r.outcome in ("refused", "equal") for r in results)


# ---- the real server, for a sample ------------------------------------------------------------
def server_cases(st: State) -> list[tuple[str, Mutation, bool]]:
    """(what, mutation, refused?) replayed against `hashret serve`: one per kind of file, and one harmless."""
    man, wal = st.files["manifest.json"], st.files["wal.jsonl"]
    codes = next(n for n in st.files if n.endswith(".codes.npy"))
    acts = next(n for n in st.files if n.endswith(".activations.npy"))
    def after(text, key):
        return text.find(key) + len(key)

    last = wal.rstrip(b"\n").rfind(b"\n") + 1
    return [
        ("wal_seq digit", Mutation("manifest.json", "flip", after(man, b'"wal_seq": '), 0), True),
        ("half a snapshot file", Mutation(codes, "truncate", len(st.files[codes]) // 2), True),
        ("a bit of the activations file", Mutation(acts, "flip", len(st.files[acts]) - 5, 2), True),
        ("a bit inside the last WAL line", Mutation("wal.jsonl", "flip", (last + len(wal)) // 2, 1), True),
        ("the year of 'saved'", Mutation("manifest.json", "flip", after(man, b'"saved": "') + 3, 0), False),
    ]


def test_the_real_server_refuses_with_exit_code_2_or_serves_the_acknowledged_state(exp, states, tmp_path):
    from serve._proto import retrieval_pb2 as pb
    from serve._proto import retrieval_pb2_grpc as pb_grpc

    st = states["crash"]
    for k, (what, m, refused) in enumerate(server_cases(st)):
        folder = tmp_path / f"case{k}"
        folder.mkdir()
        restore(folder, st.files)
        m.apply(folder)
        before = folder_bytes(folder)
        srv = ServerProcess(exp, folder, SERVER_ARGS, token=TOKEN).spawn()
        try:
            if refused:
                code_ = srv.wait_exit(120)
                log = srv.log_text()
                err = [line for line in log.splitlines() if line.startswith("error:")]
                assert code_ == 2 and err and str(folder / m.file) in err[-1], f"{what}: exit {code_}\n{log[-3000:]}"
                assert "hashret.serve: serving" not in log, f"{what}: it served a damaged gallery"
                assert folder_bytes(folder) == before, f"{what}: the refused start changed the folder"
            else:
                srv.wait_serving(120)
                ch = grpc.insecure_channel(srv.addr)
                with ch:
                    assert pb_grpc.RetrievalStub(ch).Info(pb.InfoRequest(), timeout=30).gallery.size == len(st.final)
                assert srv.stop() == 0, srv.log_text()[-3000:]
        finally:
            srv.cleanup()
        print(f"\nserver with {m} ({what}): {'exit 2, file named' if refused else 'served the acknowledged state'}")


# ---- Milvus Lite: our manifest ------------------------------------------------------------------
MILVUS_OPENS = 4  # accepted mutations also opened in Milvus Lite in CI (each open ~0.2-2 s); all under $FUZZ_ENV


@pytest.fixture(scope="module")
def milvus_state(tmp_path_factory):
    pytest.importorskip("pymilvus")
    pytest.importorskip("milvus_lite")
    from serve.gallery import create_gallery, open_gallery

    path = fast_scratch(tmp_path_factory.mktemp("milvus-fuzz")) / "gal"
    rng = random.Random(3)
    base = [("upsert", [(f"item/{i:03d}", code(rng), {"n": str(i)}) for i in range(N_BASE)])]
    run1, run2 = write_plan()
    state: dict = {}
    with create_gallery(path, "milvus", BITS, "5eed" * 16) as g:
        for n, (kind, payload) in enumerate(base + run1 + run2):
            if kind == "upsert":
                g.upsert([i for i, _, _ in payload], np.frombuffer(b"".join(c for _, c, _ in payload), np.uint8)
                         .reshape(-1, NBYTES), [md for _, _, md in payload])
            else:
                g.delete(payload)
            apply_op(state, (kind, payload))
            if n == len(base + run1) - 1:
                g.save()  # the manifest records a size once
    with open_gallery(path) as g:
        assert contents(g) == as_list(state)
    files = {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}
    yield State("milvus", path, files, as_list(state), 0, {})
    shutil.rmtree(path.parent, ignore_errors=True)


def test_milvus_lite_manifest_damage_is_refused_or_harmless(milvus_state):
    """Only manifest.json is ours: milvus.db is Milvus Lite's SQLite file, with no checksums of its own.

    Every accepted mutation must read back the same sealed fields (bits, model, uri, collection,
    index type, size), which are all MilvusGallery takes from the manifest; a few are also opened
    in Milvus Lite and their content compared (all of them under $HASHRET_FUZZ_MUTATIONS).
    """
    from hashret.manifest import GALLERY, GALLERY_CHECKSUM_FIELDS, load_manifest
    from serve.gallery import open_gallery

    st = milvus_state
    theirs = sorted(set(st.files) - {"manifest.json"})
    assert "milvus.db" in theirs
    def sealed(m):
        return {k: m.get(k) for k in GALLERY_CHECKSUM_FIELDS}

    want = sealed(json.loads(st.files["manifest.json"]))
    muts = plan({"manifest.json": st.files["manifest.json"]}, budget() // 3, seed=16, focus={})
    opens = len(muts) if FUZZ_ENV in os.environ else MILVUS_OPENS
    results, opened = [], 0
    for m in muts:
        m.apply(st.path)
        try:
            try:
                got = load_manifest(st.path, kind=GALLERY)  # the check open_gallery makes before Milvus
            except HashretError as e:
                ok = e.exit_code == 2 and m.file in str(e)
                results.append(Result(m, "refused" if ok else "FAIL refusal without exit 2 and the file", str(e)))
                continue
            if sealed(got) != want:
                results.append(Result(m, "FAIL accepted with other sealed fields"))
                continue
            if opened < opens:
                opened += 1
                # a copy per open: Milvus Lite keeps one server per db path per process, and
                # reopening a path right after closing it can find that server gone
                copy = st.path.parent / f"open-{opened}"
                shutil.copytree(st.path, copy, ignore=shutil.ignore_patterns(".*.lock"))
                try:
                    with open_gallery(copy) as g:
                        same = contents(g) == st.final
                finally:
                    shutil.rmtree(copy, ignore_errors=True)
                if not same:
                    results.append(Result(m, "FAIL served content other than the acknowledged state"))
                    continue
            results.append(Result(m, "equal"))
        finally:  # Milvus Lite's files are left to it: rewriting them under it breaks its server
            restore(st.path, {"manifest.json": st.files["manifest.json"]}, prune=False)
    print("\n" + report("milvus-lite manifest", results) + f"\n  ({opened} accepted mutations opened in Milvus Lite; "
          f"not mutated, Milvus' own: {', '.join(theirs)})")
    failed = [r for r in results if r.outcome.startswith("FAIL")]
    assert not failed, "\n".join(f"{r.mutation}: {r.outcome}: {r.message[:300]}" for r in failed[:20])
    outcomes = Counter(r.outcome for r in results)
    assert outcomes["refused"] and outcomes["equal"] and opened, outcomes
