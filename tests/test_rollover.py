"""Model rollover on a real server: LoadCandidate / Promote / Rollback / Unload over the Admin
service, writes while two models are loaded, shadow comparison metrics, `hashret rollover`,
and a 60 s soak across a whole cycle. Two real exports (efficientnet-lite0 + 64-bit heads of
different seeds), real Grocery images, real FAISS galleries.
"""
from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from serve.client import Item, RetrievalClient
from serve.rollover_cli import AdminClient
from serve.server import BackgroundServer, ServeConfig
from serve.service import Limits
from serve.shadow import rank_correlation, topk_overlap

TOKEN, ADMIN = "write-token", "admin-token"
N_GALLERY, N_QUERY = 48, 12
SC = grpc.StatusCode


# ---- fixtures ------------------------------------------------------------------------------
def make_exp(out: Path, seed: int, bits: int = 64) -> Path:
    """An EXP folder: ImageNet efficientnet-lite0 + a 64-bit head seeded with `seed`, in ONNX."""
    import torch

    from export.onnx_format import onnx_from_run
    from hashret.manifest import SCHEMA_VERSION, file_entry, now_iso, versions, write_manifest
    from hashret.models import HashEncoder, HashHead, build_backbone

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    bb = build_backbone("efficientnet-lite0", "imagenet")
    enc = HashEncoder(bb, HashHead(bb.dim, bits)).eval()
    onnx_from_run(None, out / "model.onnx", exporter="legacy", slim=False, encoder=enc)
    write_manifest(out, {
        "schema_version": SCHEMA_VERSION, "kind": "export", "created": now_iso(), "bits": bits,
        "preprocessing": bb.spec.to_dict(),
        "backbone": {"name": bb.name, "weights": bb.weights, "feature_dim": bb.dim},
        "method": {"name": "hashnet", "seed": seed}, "dataset": {"format": "grocery"},
        "export": {"files": {"model.onnx": file_entry(out / "model.onnx")}},
        "versions": versions(),
    })
    return out


@pytest.fixture(scope="module")
def exps(tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("exps")
    return {seed: make_exp(root / f"seed{seed}", seed) for seed in (0, 1)}


@pytest.fixture(scope="module")
def data(grocery_root):
    from hashret.datasets import read_dataset

    splits = read_dataset(grocery_root, "grocery")
    db = splits.database[:: len(splits.database) // N_GALLERY][:N_GALLERY]
    queries = [s.path for s in splits.query[:: len(splits.query) // N_QUERY][:N_QUERY]]
    root = Path(splits.root)
    paths = [s.path for s in db]
    ids = [Path(p).relative_to(root).as_posix() for p in paths]
    metas = [{"path": i, "label": str(s.label)} for i, s in zip(ids, db)]
    return root, paths, ids, metas, queries


def _build(exp: Path, out: Path, data, prefix: str = "") -> Path:
    from serve.index_cli import build

    _, paths, ids, metas, _ = data
    build(exp, out, paths, [prefix + i for i in ids], metas, progress=False)
    return out


@pytest.fixture(scope="module")
def galleries(tmp_path_factory, exps, data) -> dict[str, Path]:
    """Pristine galleries (copy before serving): seed 0, seed 1, and seed 1 with 'v2/' ids."""
    root = tmp_path_factory.mktemp("gals")
    return {
        "g0": _build(exps[0], root / "g0", data),
        "g1": _build(exps[1], root / "g1", data),
        "g1v2": _build(exps[1], root / "g1v2", data, prefix="v2/"),
    }


def copy_gal(src: Path, tmp_path: Path, name: str) -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def config(exp, gal, **kw) -> ServeConfig:
    base = dict(model=exp, gallery=gal, host="127.0.0.1", port=0, token=TOKEN, admin_token=ADMIN,
                metrics_port=0, grace_s=2.0, decode_threads=2, limits=Limits(max_k=100))
    base.update(kw)
    return ServeConfig(**base)


def model_id(exp: Path) -> str:
    return json.loads((exp / "manifest.json").read_text())["export"]["files"]["model.onnx"]["sha256"]


def metric(port: int, name: str, **labels) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name + ("{" + want + "}" if want else " ")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not in /metrics")


# ---- bad input -------------------------------------------------------------------------------
def test_admin_needs_admin_token(exps, galleries, tmp_path, data):
    with BackgroundServer(config(exps[0], copy_gal(galleries["g0"], tmp_path, "live"))) as srv:
        for token in (None, "wrong", TOKEN):  # the write token is not an admin token
            with AdminClient(srv.address, token, timeout=30) as a:
                for call in (a.status, a.promote, a.rollback, a.unload, a.items,
                             lambda: a.load_candidate(exps[1], galleries["g1"])):
                    with pytest.raises(grpc.RpcError) as e:
                        call()
                    assert e.value.code() == SC.UNAUTHENTICATED
                    assert "admin" in e.value.details()
        with AdminClient(srv.address, ADMIN, timeout=30) as a:
            st = a.status()
            assert st.live_model_id == model_id(exps[0]) and st.standby_model_id == ""
            # the admin token does not authorize writes either
            with RetrievalClient(srv.address, token=ADMIN, timeout=30) as c:
                with pytest.raises(grpc.RpcError) as e:
                    c.delete([data[2][0]])
                assert e.value.code() == SC.UNAUTHENTICATED


def test_admin_service_off_without_token(exps, galleries, tmp_path):
    with BackgroundServer(config(exps[0], copy_gal(galleries["g0"], tmp_path, "live"), admin_token=None)) as srv:
        with AdminClient(srv.address, ADMIN, timeout=30) as a, pytest.raises(grpc.RpcError) as e:
            a.status()
        assert e.value.code() == SC.UNIMPLEMENTED


def test_admin_token_must_differ_from_write_token(exps, galleries, tmp_path):
    from hashret.errors import BadInput

    with pytest.raises(BadInput, match="--admin-token-file .*same token"):
        BackgroundServer(config(exps[0], copy_gal(galleries["g0"], tmp_path, "live"), admin_token=TOKEN)).start()


def _damage_model(exp: Path, tmp_path: Path, gal: Path) -> tuple[Path, Path, str]:
    bad = tmp_path / "bad-exp"
    shutil.copytree(exp, bad)
    raw = bytearray((bad / "model.onnx").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (bad / "model.onnx").write_bytes(bytes(raw))
    return bad, gal, "model.onnx"


def _damage_gallery(exp: Path, tmp_path: Path, gal: Path) -> tuple[Path, Path, str]:
    g = copy_gal(gal, tmp_path, "bad-gal")
    victim = max((p for p in g.rglob("*") if p.is_file() and p.name != "manifest.json"), key=lambda p: p.stat().st_size)
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    return exp, g, victim.name


def _other_bits(exp: Path, tmp_path: Path, gal: Path) -> tuple[Path, Path, str]:
    bad = tmp_path / "bits-exp"
    shutil.copytree(exp, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["bits"] = 32
    (bad / "manifest.json").write_text(json.dumps(m))
    return bad, gal, "32 bits"


def _other_model(exp: Path, tmp_path: Path, gal: Path) -> tuple[Path, Path, str]:
    return exp, tmp_path / "gal0", "built for model"


@pytest.mark.parametrize("damage", [_damage_model, _damage_gallery, _other_bits, _other_model],
                         ids=["damaged-model", "damaged-gallery", "other-code-length", "other-model-id"])
def test_bad_candidate_refused_live_untouched(damage, exps, galleries, tmp_path, data):
    live_gal = copy_gal(galleries["g0"], tmp_path, "live")
    copy_gal(galleries["g0"], tmp_path, "gal0")  # seed 0's gallery: wrong for seed 1's model
    exp, gal, named = damage(exps[1], tmp_path, copy_gal(galleries["g1"], tmp_path, "cand"))
    query = data[4][0]
    with BackgroundServer(config(exps[0], live_gal)) as srv, AdminClient(srv.address, ADMIN, timeout=120) as a, \
            RetrievalClient(srv.address, timeout=60) as c:
        before = c.search(query, k=5)
        with pytest.raises(grpc.RpcError) as e:
            a.load_candidate(exp, gal)
        assert e.value.code() in (SC.FAILED_PRECONDITION, SC.INVALID_ARGUMENT, SC.NOT_FOUND), e.value.details()
        assert named in e.value.details()
        st = a.status()
        assert st.live_model_id == model_id(exps[0]) and st.standby_model_id == ""
        assert c.search(query, k=5) == before
        assert c.stub.Search(c._request(query, 5, None), timeout=60).model_id == model_id(exps[0])


def test_promote_rollback_without_pairs_fail_precondition(exps, galleries, tmp_path):
    with BackgroundServer(config(exps[0], copy_gal(galleries["g0"], tmp_path, "live"))) as srv, \
            AdminClient(srv.address, ADMIN, timeout=120) as a:
        for call, what in ((a.promote, "no candidate"), (a.rollback, "no previous")):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == SC.FAILED_PRECONDITION and what in e.value.details()
        a.load_candidate(exps[1], copy_gal(galleries["g1"], tmp_path, "cand"))
        with pytest.raises(grpc.RpcError) as e:  # a candidate is not a previous pair
            a.rollback()
        assert e.value.code() == SC.FAILED_PRECONDITION


def test_not_enough_memory_refused(exps, galleries, tmp_path):
    with BackgroundServer(config(exps[0], copy_gal(galleries["g0"], tmp_path, "live"))) as srv, \
            AdminClient(srv.address, ADMIN, timeout=120) as a:
        srv.server.pairs._available = lambda: 300 << 20  # less than the model x factor + reserve
        with pytest.raises(grpc.RpcError) as e:
            a.load_candidate(exps[1], copy_gal(galleries["g1"], tmp_path, "cand"))
        assert e.value.code() == SC.RESOURCE_EXHAUSTED
        assert "MemAvailable" in e.value.details() and "MiB" in e.value.details()
        assert a.status().standby_model_id == ""


# ---- the cycle and writes --------------------------------------------------------------------
def test_cycle_model_ids_and_writes(exps, galleries, tmp_path, data):
    """LoadCandidate -> Promote -> Rollback -> Unload; answers name their model; writes follow the rule."""
    root, paths, ids, _, queries = data
    m0, m1 = model_id(exps[0]), model_id(exps[1])
    with BackgroundServer(config(exps[0], copy_gal(galleries["g0"], tmp_path, "live"))) as srv, \
            AdminClient(srv.address, ADMIN, timeout=120) as a, \
            RetrievalClient(srv.address, token=TOKEN, timeout=60) as c:
        def answered_by() -> set[str]:
            s = c.stub.Search(c._request(queries[0], 5, None), timeout=60).model_id
            b = c.stub.SearchBatch(_batch(queries[:2]), timeout=60).model_id
            e = c.stub.Encode(_encode(queries[0]), timeout=60).model_id
            return {s, b, e}

        assert answered_by() == {m0}
        st = a.load_candidate(exps[1], copy_gal(galleries["g1"], tmp_path, "cand"))
        assert (st.live_model_id, st.standby_model_id, st.standby_role) == (m0, m1, "candidate")
        info = c.info()
        assert (info.model_id, info.standby_model_id, info.standby_role) == (m0, m1, "candidate")
        assert answered_by() == {m0}

        # an image upsert goes to both galleries, each encoded by its own model
        img = Path(queries[1]).read_bytes()
        assert c.upsert([Item("new-1", image=img, metadata={"k": "v"})]) == 1
        live, cand = srv.server.pairs.live, srv.server.pairs.standby
        code0, code1 = live.gallery.get("new-1")[0], cand.gallery.get("new-1")[0]
        assert code0.tobytes() == c.encode(img)[0]
        assert not np.array_equal(code0, code1)  # two models, two codes
        # a code upsert is refused while two models are loaded, and nothing is written anywhere
        n_live, n_cand = live.gallery.size, cand.gallery.size
        with pytest.raises(grpc.RpcError) as e:
            c.upsert([Item("new-2", image=img), Item("code-1", code=code0.tobytes())])
        assert e.value.code() == SC.FAILED_PRECONDITION and "carries a code" in e.value.details()
        assert (live.gallery.size, cand.gallery.size) == (n_live, n_cand)
        # a delete removes from both
        assert c.delete(["new-1", ids[0]]) == 2
        assert (live.gallery.size, cand.gallery.size) == (n_live - 2, n_cand - 2)

        st = a.promote()
        assert (st.live_model_id, st.standby_model_id, st.standby_role) == (m1, m0, "previous")
        assert answered_by() == {m1}
        assert c.info().model_id == m1
        st = a.rollback()
        assert (st.live_model_id, st.standby_model_id, st.standby_role) == (m0, m1, "candidate")
        assert answered_by() == {m0}
        st = a.unload()
        assert st.standby_model_id == "" and st.standby_role == ""
        with pytest.raises(grpc.RpcError) as e:
            a.promote()
        assert e.value.code() == SC.FAILED_PRECONDITION
        # with one model loaded, code upserts are accepted again
        assert c.upsert([Item("code-1", code=code0.tobytes())]) == 1


def _batch(images):
    from serve._proto import retrieval_pb2 as pb

    return pb.SearchBatchRequest(items=[pb.SearchRequest(image=Path(p).read_bytes(), k=5) for p in images])


def _encode(image):
    from serve._proto import retrieval_pb2 as pb

    return pb.EncodeRequest(image=Path(image).read_bytes())


# ---- shadow metrics --------------------------------------------------------------------------
def offline_top(exp: Path, gal: Path, images, k: int, rerank_factor: int) -> list[list[str]]:
    """Top-k ids of each image: the export's engine (one image at a time) searched in `gal`,
    re-ranked by cosine as the server does when rerank_factor > 0."""
    from hashret import codes as hcodes
    from hashret.engines import open_engine
    from hashret.images import PreprocessSpec, load_image
    from serve.gallery import open_gallery

    spec = PreprocessSpec.from_dict(json.loads((exp / "manifest.json").read_text())["preprocessing"])
    eng = open_engine(exp, "ort")
    try:
        z = np.concatenate([eng.encode(load_image(p, spec)[None]) for p in images])
    finally:
        eng.close()
    with open_gallery(gal) as g:
        hits = g.search(hcodes.pack(z), k, None, z if rerank_factor else None, rerank_factor)
        return [[h.id for h in row] for row in hits]


@pytest.mark.parametrize("same,rerank", [(True, 10), (False, 10), (False, 0)],
                         ids=["identical-model", "other-seed", "other-seed-hamming-only"])
def test_shadow_overlap_metric(same, rerank, exps, galleries, tmp_path, data):
    """The bar: 1.0 for an identical candidate; for another seed below 1 and within 0.02 of the
    offline top-10 overlap of the two models on the same queries (with the server's re-ranking)."""
    queries = data[4]
    cand_exp = exps[0] if same else exps[1]
    cand_gal = copy_gal(galleries["g0" if same else "g1"], tmp_path, "cand")
    cfg = config(exps[0], copy_gal(galleries["g0"], tmp_path, "live"), shadow_fraction=1.0, rerank_factor=rerank)
    with BackgroundServer(cfg) as srv, AdminClient(srv.address, ADMIN, timeout=120) as a, \
            RetrievalClient(srv.address, timeout=60) as c:
        a.load_candidate(cand_exp, cand_gal)
        live_answers = [[h.id for h in c.search(q, k=10)] for q in queries]
        st = a.status()  # waits for the shadow queue to drain
        assert st.shadow.compared == len(queries) and st.shadow.dropped == 0 and st.shadow.failed == 0
        label = model_id(cand_exp)[:12]
        s = metric(srv.metrics_port, "hashret_shadow_topk_overlap_sum", candidate=label)
        n = metric(srv.metrics_port, "hashret_shadow_topk_overlap_count", candidate=label)
        assert n == len(queries)
        assert st.shadow.mean_overlap == pytest.approx(s / n)
    cand_top = offline_top(cand_exp, cand_gal, queries, 10, rerank)
    offline = float(np.mean([topk_overlap(x, y) for x, y in zip(live_answers, cand_top)]))
    if same:
        assert st.shadow.mean_overlap == 1.0 and s / n == 1.0
        assert st.shadow.mean_rank_correlation == pytest.approx(1.0)
    else:
        assert st.shadow.mean_overlap < 1.0
        assert abs(st.shadow.mean_overlap - offline) <= 0.02, (st.shadow.mean_overlap, offline)
        # and the same offline overlap from both models computed independently of the server
        live_top = offline_top(exps[0], galleries["g0"], queries, 10, rerank)
        indep = float(np.mean([topk_overlap(x, y) for x, y in zip(live_top, cand_top)]))
        assert abs(st.shadow.mean_overlap - indep) <= 0.02, (st.shadow.mean_overlap, indep)


@pytest.mark.parametrize("a,b,overlap,rho", [
    (["x", "y", "z"], ["x", "y", "z"], 1.0, 1.0),
    (["x", "y", "z"], ["z", "y", "x"], 1.0, -1.0),
    (["x", "y"], ["p", "q"], 0.0, None),
    ([], [], 1.0, 1.0),
])
def test_overlap_and_rank_correlation(a, b, overlap, rho):
    assert topk_overlap(a, b) == overlap
    r = rank_correlation(a, b)
    if rho is None:
        assert r < 0  # disjoint lists rank each other's items last
    else:
        assert r == pytest.approx(rho)


# ---- the CLI ---------------------------------------------------------------------------------
def test_rollover_cli_builds_loads_and_promotes(exps, galleries, tmp_path, data):
    from hashret.cli import main

    root, _, ids, _, queries = data
    tok = tmp_path / "admin.token"
    tok.write_text(ADMIN + "\n")
    out = tmp_path / "new-gal"
    with BackgroundServer(config(exps[0], copy_gal(galleries["g0"], tmp_path, "live"), shadow_fraction=1.0)) as srv:
        stop = threading.Event()

        def traffic():
            with RetrievalClient(srv.address, timeout=60) as c:
                while not stop.is_set():
                    for q in queries[:3]:
                        c.search(q, k=10)
                    time.sleep(0.05)

        t = threading.Thread(target=traffic, daemon=True)
        t.start()
        try:
            rc = main(["rollover", str(exps[1]), "--out", str(out), "--image-root", str(root), "--addr", srv.address,
                       "--admin-token-file", str(tok), "--shadow-s", "3", "--yes", "--no-progress"])
        finally:
            stop.set()
            t.join(60)
        assert rc == 0
        with AdminClient(srv.address, ADMIN, timeout=60) as a:
            st = a.status()
        assert (st.live_model_id, st.standby_model_id, st.standby_role) == (model_id(exps[1]), model_id(exps[0]), "previous")
        assert srv.server.pairs.live.gallery.size == len(ids)
        # a threshold the answers cannot meet keeps the live model: exit 1
        rc = main(["rollover", str(exps[0]), "--out", str(tmp_path / "back"), "--image-root", str(root),
                   "--addr", srv.address, "--admin-token-file", str(tok), "--shadow-s", "0", "--yes",
                   "--min-overlap", "0.5", "--no-progress"])
        assert rc == 1
        with AdminClient(srv.address, ADMIN, timeout=60) as a:
            assert a.status().live_model_id == model_id(exps[1])


def test_rollover_cli_missing_images_named(exps, galleries, tmp_path, data):
    from hashret.cli import main

    tok = tmp_path / "admin.token"
    tok.write_text(ADMIN)
    with BackgroundServer(config(exps[0], copy_gal(galleries["g0"], tmp_path, "live"))) as srv:
        rc = main(["rollover", str(exps[1]), "--out", str(tmp_path / "x"), "--image-root", str(tmp_path),
                   "--addr", srv.address, "--admin-token-file", str(tok), "--shadow-s", "0", "--no-progress"])
        assert rc == 2
        assert not (tmp_path / "x").exists()
        with AdminClient(srv.address, ADMIN, timeout=60) as a:
            assert a.status().standby_model_id == ""


# ---- soak ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_soak_rollover_cycle_60s(exps, galleries, tmp_path, data):
    """60 s of Search at concurrency 16 across LoadCandidate -> shadow -> Promote -> Rollback.

    Zero failures; each answer's model id is the one live when it was admitted (checked
    against the client-side times of the switches); no answer mixes galleries (the candidate's
    ids carry a 'v2/' prefix, so every hit of an answer must match its model id).
    """
    queries = [Path(q).read_bytes() for q in data[4]]
    m0, m1 = model_id(exps[0]), model_id(exps[1])
    cfg = config(exps[0], copy_gal(galleries["g0"], tmp_path, "live"), shadow_fraction=0.2, queue_size=256)
    duration, conc = 60.0, 16
    events: list[tuple[str, float, float]] = []  # (what, client time before the call, after it)
    results: list[tuple[float, float, str, list[str]]] = []
    failures: list[str] = []
    lock = threading.Lock()
    with BackgroundServer(cfg) as srv, AdminClient(srv.address, ADMIN, timeout=120) as a:
        t0 = time.monotonic()
        end = t0 + duration

        def worker(n: int) -> None:
            from serve._proto import retrieval_pb2 as pb

            with RetrievalClient(srv.address, timeout=30) as c:
                i = n
                while time.monotonic() < end:
                    req = pb.SearchRequest(image=queries[i % len(queries)], k=10)
                    i += 1
                    sent = time.monotonic()
                    try:
                        r = c.stub.Search(req, timeout=30)
                    except grpc.RpcError as e:
                        with lock:
                            failures.append(f"{e.code().name}: {e.details()}")
                        continue
                    with lock:
                        results.append((sent, time.monotonic(), r.model_id, [h.id for h in r.hits]))

        def step(what, call):
            before = time.monotonic()
            st = call()
            events.append((what, before, time.monotonic()))
            return st

        with ThreadPoolExecutor(conc) as pool:
            futs = [pool.submit(worker, n) for n in range(conc)]
            time.sleep(5)
            step("load", lambda: a.load_candidate(exps[1], copy_gal(galleries["g1v2"], tmp_path, "cand")))
            time.sleep(max(0.0, t0 + 25 - time.monotonic()))  # shadow
            shadow = a.status().shadow
            step("promote", a.promote)
            time.sleep(max(0.0, t0 + 42 - time.monotonic()))
            step("rollback", a.rollback)
            for f in futs:
                f.result(timeout=duration + 90)  # bounded: every call has a 30 s deadline
        elapsed = time.monotonic() - t0
    assert failures == []
    assert elapsed >= duration
    assert len(results) > 100
    assert shadow.compared > 0 and shadow.mean_overlap < 1.0
    (_, _, load_done), (_, p0, p1), (_, r0, r1) = events
    seen = {m0: 0, m1: 0}
    for sent, got, mid, hits in results:
        seen[mid] += 1
        assert hits, "every query has hits in a 48-item gallery"
        # no answer mixes galleries: all hits come from the gallery of the model that answered
        assert all(h.startswith("v2/") == (mid == m1) for h in hits), (mid, hits)
        # admitted strictly before Promote was called, or after Rollback returned: the old model
        if got < p0 or sent > r1:
            assert mid == m0
        # admitted after Promote returned and answered before Rollback was called: the new one
        elif sent > p1 and got < r0:
            assert mid == m1
    assert seen[m0] > 0 and seen[m1] > 0


def test_serve_cli_reads_admin_token_and_shadow_fraction(tmp_path):
    from hashret.cli import build_parser
    from hashret.errors import BadInput
    from serve.cli import config_from_args

    tok = tmp_path / "admin.token"
    tok.write_text("\n" + ADMIN + "\n")
    args = build_parser("serve").parse_args(["serve", "--model", "m", "--gallery", "g",
                                             "--admin-token-file", str(tok), "--shadow-fraction", "0.25"])
    cfg = config_from_args(args)
    assert (cfg.admin_token, cfg.shadow_fraction) == (ADMIN, 0.25)
    assert config_from_args(build_parser("serve").parse_args(["serve", "--model", "m", "--gallery", "g"])).admin_token is None
    tok.write_text("one\ntwo\n")
    with pytest.raises(BadInput, match="--admin-token-file"):
        config_from_args(args)


def test_shadow_fraction_out_of_range_refused(exps, galleries, tmp_path):
    from hashret.errors import BadInput

    with pytest.raises(BadInput, match="--shadow-fraction 1.5 | must be between 0 and 1"):
        BackgroundServer(config(exps[0], copy_gal(galleries["g0"], tmp_path, "live"), shadow_fraction=1.5)).start()
