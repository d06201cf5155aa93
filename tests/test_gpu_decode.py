"""serve.gpu_decode: the batched device decode, run here on torchvision's CPU decoder (device="cpu").

The header rules (what goes to the CPU routine), the limits checked before any device work, a
corrupt JPEG failing alone inside a batch, the geometry against hashret.images on real Grocery
photos, the code parity report, and the service answering through it. CUDA-only checks skip.
"""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hashret.errors import BadInput, Unavailable
from hashret.images import PreprocessSpec, load_image
from serve.gpu_decode import _FALLBACK, GpuDecoder, bit_agreement, draft_size, parity, read_jpeg_header

SPEC = PreprocessSpec()

try:
    import torch

    CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    CUDA = False
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: torch.cuda.is_available() is False here")


@pytest.fixture(scope="module")
def photos(grocery_root) -> list[bytes]:
    paths = sorted((Path(grocery_root) / "dataset" / "test").rglob("*.jpg"))
    assert len(paths) > 600
    return [p.read_bytes() for p in paths[::25][:24]]


@pytest.fixture
def dec():
    d = GpuDecoder(SPEC, "cpu", max_bytes=5_000_000, max_pixels=20_000_000, max_batch=8)
    yield d
    d.close()


def jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def with_luma_sampling(data: bytes, hv: int) -> bytes:
    """The same file with the SOF's luma sampling byte replaced (only the header is read)."""
    pos = data.index(b"\xff\xc0")
    out = bytearray(data)
    out[pos + 11] = hv  # after the marker (2), length (2), P, Y, X, Nf (6) and the first component's id (1)
    return bytes(out)


def truncated(data: bytes) -> bytes:
    """The first half of a photo: its header is whole (it passes every check and reaches the device
    decoder), its scan is cut: both decoders refuse it."""
    return data[: len(data) // 2]


def test_header_rules(photos):
    img = Image.open(io.BytesIO(photos[0]))
    ok = read_jpeg_header(photos[0])
    assert (ok.reason, ok.frame, ok.width, ok.height) == (None, "baseline", *img.size)
    assert read_jpeg_header(jpeg(img, progressive=True)).reason is None  # progressive 4:2:0: to the GPU
    assert read_jpeg_header(jpeg(img, subsampling=0)).sampling == [(1, 1)] * 3
    exif = Image.Exif()
    exif[0x0112] = 6
    upright = Image.Exif()
    upright[0x0112] = 1
    buf = io.BytesIO()
    img.save(buf, "PNG")
    cases = {
        buf.getvalue(): "not a JPEG",
        jpeg(img.convert("L")): "grayscale",
        jpeg(img.convert("CMYK")): "CMYK/YCCK",
        jpeg(img, exif=exif.tobytes()): "EXIF orientation 6",
        jpeg(img, exif=upright.tobytes()): None,
        with_luma_sampling(photos[0], 0x41): "chroma sampling [(4, 1), (1, 1), (1, 1)]",
        photos[0][:100]: "header does not parse",
    }
    for data, why in cases.items():
        got = read_jpeg_header(data).reason
        assert (got or "").startswith(why or "") and (got is None) == (why is None), (why, got)


def test_draft_size_matches_pillow():
    """The size the CPU routine decodes a large JPEG at, as Pillow's draft picks it."""
    for w, h in [(4000, 3000), (3000, 4000), (1024, 1024), (1023, 2000), (5000, 1100), (300, 200)]:
        img = Image.new("RGB", (w, h), (90, 120, 30))
        opened = Image.open(io.BytesIO(jpeg(img)))
        if min(w, h) >= 4 * SPEC.resize:
            from hashret.images import _draft_size

            opened.draft(None, _draft_size(w, h, 2 * SPEC.resize))
        assert draft_size(w, h, SPEC) == opened.size, (w, h)


def test_pixels_match_the_cpu_routine_on_real_photos(photos, dec):
    """Same geometry as hashret.images.resize_crop: pixel differences of a level at most (libjpeg's
    IDCT here on both sides; nvJPEG on a GPU adds its own, measured by the parity report)."""
    got = np.stack(dec.decode_batch(photos))
    want = np.stack([load_image(d, SPEC) for d in photos])
    diff = np.abs(got.astype(int) - want.astype(int))
    print(f"pixels: mean abs diff {diff.mean():.4f}, max {diff.max()} over {len(photos)} photos")
    assert got.shape == want.shape == (len(photos), SPEC.crop, SPEC.crop, 3)
    assert diff.mean() < 0.05 and diff.max() <= 2
    # a 12 MP photo: the CPU routine drafts it at 1/4 scale; the device resizes the full image
    big = jpeg(Image.open(io.BytesIO(photos[1])).resize((4032, 3024)), quality=92)
    d = np.abs(dec(big, "big").astype(int) - load_image(big, SPEC).astype(int))
    print(f"4032x3024: mean abs diff {d.mean():.4f}")
    assert d.mean() < 1.0
    # a shifted crop box would move edges by pixels: compare against a box one pixel off
    shifted = np.abs(dec(big, "big")[:, 1:].astype(int) - load_image(big, SPEC)[:, :-1].astype(int)).mean()
    assert shifted > 2 * d.mean()


def test_fallbacks_are_the_cpu_routine_exactly(photos, dec):
    img = Image.open(io.BytesIO(photos[2]))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, "PNG")
    for data in (jpeg(img, exif=exif.tobytes()), jpeg(img.convert("CMYK")), buf.getvalue(), jpeg(img.convert("L"))):
        assert np.array_equal(dec(data), load_image(data, SPEC))
    assert dec.stats["gpu"] == 0 and dec.stats["cpu"] == 4 and dec.stats["batches"] == 0
    assert set(dec.fallbacks) == {"EXIF orientation", "CMYK/YCCK", "not a JPEG", "grayscale"}


def test_counters_reach_prometheus(photos, dec):
    """`hashret serve --decode cuda` registers DecodeCollector: where images were decoded, the
    fallbacks by reason and the batch splits, read from the live decoder at scrape time."""
    from prometheus_client import CollectorRegistry, generate_latest

    from serve.gpu_decode import DecodeCollector

    live = {"decoder": None}
    reg = CollectorRegistry()
    reg.register(DecodeCollector(lambda: live["decoder"]))
    assert b"hashret_decode" not in generate_latest(reg)  # no GPU decoder: nothing to report
    live["decoder"] = dec
    img = Image.open(io.BytesIO(photos[2]))
    for data in (photos[0], photos[1], jpeg(img.convert("CMYK")), jpeg(img.convert("L")), jpeg(img.convert("L"))):
        dec(data)
    dec.decode_batch(photos[:3] + [truncated(photos[3])])
    text = generate_latest(reg).decode()
    assert 'hashret_decode_images_total{on="device"} 2.0' in text
    assert 'hashret_decode_images_total{on="cpu"} 3.0' in text
    assert 'hashret_decode_cpu_fallbacks_total{reason="grayscale"} 2.0' in text
    assert 'hashret_decode_cpu_fallbacks_total{reason="CMYK/YCCK"} 1.0' in text
    batches, splits = dec.counters()[0]["batches"], dec.counters()[0]["split"]
    assert splits >= 2 and f"hashret_decode_device_batch_splits_total {float(splits)}" in text
    assert f"hashret_decode_device_batches_total {float(batches)}" in text


def test_limits_are_checked_before_the_device(photos, dec):
    big = jpeg(Image.new("RGB", (5000, 4100), (1, 2, 3)))  # 20.5 MP in a small file
    with pytest.raises(BadInput, match=r"huge \| 5000x4100 = 20500000 pixel count exceeds the limit of 20000000"):
        dec(big, "huge")
    with pytest.raises(BadInput, match=r"fat \| 5000001 bytes exceeds the limit of 5000000 bytes"):
        dec(photos[0] + b"\0" * (5_000_001 - len(photos[0])), "fat")
    assert dec.stats["batches"] == 0  # nothing was queued for the device


def test_a_corrupt_jpeg_fails_alone_in_its_batch(photos, dec):
    bad = truncated(photos[3])
    assert read_jpeg_header(bad).reason is None
    batch = photos[:3] + [bad] + photos[4:8]
    out = dec.decode_batch(batch)
    assert out[3] is _FALLBACK and all(isinstance(o, np.ndarray) for i, o in enumerate(out) if i != 3)
    assert dec.stats["split"] >= 3  # halved down to the bad one: log2(8)
    # through the callers' threads, as the server calls it: that image alone gets BadInput
    with ThreadPoolExecutor(8) as pool:
        futs = [pool.submit(dec, d, f"item {n}") for n, d in enumerate(batch)]
    with pytest.raises(BadInput, match=r"item 3 \| corrupt or truncated image"):
        futs[3].result()
    for n, f in enumerate(futs):
        if n != 3:
            assert np.abs(f.result().astype(int) - load_image(batch[n], SPEC).astype(int)).max() <= 2


def test_out_of_memory_halves_the_batch_after_freeing_the_failed_attempt(photos, dec, monkeypatch):
    """A device batch that runs out of memory is decoded again in halves, and the memory the
    failed attempt held (here a stand-in object) is free before the halves run: a retry from
    inside the except block would keep it alive through the error's traceback."""
    import weakref

    class Blob:
        pass

    real, last, held, sizes = dec._device_batch, [None], [0], []

    def short_of_memory(datas):
        if last[0] is not None and last[0]() is not None:
            held[0] += 1
        blob = Blob()
        last[0] = weakref.ref(blob)
        sizes.append(len(datas))
        if len(datas) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 MiB")
        return real(datas)

    monkeypatch.setattr(dec, "_device_batch", short_of_memory)
    out = dec.decode_batch(photos[:8])
    assert sizes == [8, 4, 2, 2, 4, 2, 2] and dec.stats["split"] == 3
    assert all(isinstance(o, np.ndarray) for o in out)  # nothing fell back: smaller batches fit
    assert held[0] == 0


def test_closed_decoder_and_missing_cuda(photos):
    d = GpuDecoder(SPEC, "cpu")
    d.close()
    with pytest.raises(Unavailable, match="the GPU decoder is closed"):
        d(photos[0])
    if not CUDA:
        with pytest.raises(Unavailable, match=r"--decode cuda \| torch sees no CUDA GPU"):
            GpuDecoder(SPEC, "cuda")
    with pytest.raises(BadInput, match=r"--decode 'gpu' \| must be cpu, cuda or cuda:N"):
        GpuDecoder(SPEC, "gpu")
    from serve.cli import check_decode

    with pytest.raises(BadInput, match=r"--decode 'nvjpeg' \| must be cpu, cuda or cuda:N"):
        check_decode("nvjpeg")
    assert check_decode("cuda:1") == "cuda:1"


def test_parity_report_on_real_photos(photos, tmp_path_factory):
    """Codes of the same photos decoded both ways: the agreement the parity check reports."""
    from hashret.engines import open_engine
    from tests.test_fuzz import shared_exp

    exp = shared_exp(tmp_path_factory)
    engine = open_engine(exp, "ort", "cpu")
    try:
        r = parity(engine, SPEC, photos, device="cpu", batch=8)
    finally:
        engine.close()
    print("parity (torchvision CPU decoder):", r)
    assert r["images"] == len(photos) and r["decoded_on_device"] == len(photos) and r["decoded_on_cpu"] == 0
    assert r["bit_agreement"] >= 0.95 and r["pixel_max_abs_diff"] <= 2
    assert bit_agreement(np.zeros((2, 8), np.uint8), np.full((2, 8), 255, np.uint8)) == 0.0


def test_golden_files_errors(tmp_path):
    from serve.gpu_decode import golden_files

    with pytest.raises(BadInput, match=r"golden\.npz \| not found: export EXP with --golden"):
        golden_files(tmp_path, {})
    np.savez(tmp_path / "golden.npz", paths=np.array(["a/b.jpg"]))
    with pytest.raises(BadInput, match="names no dataset root: pass --data"):
        golden_files(tmp_path, {"dataset": {}})
    with pytest.raises(BadInput, match=r"b\.jpg \| not found \(1 missing\)"):
        golden_files(tmp_path, {"dataset": {"root": str(tmp_path)}})


def test_service_searches_through_the_decoder(photos, tmp_path_factory):
    """RetrievalService with the batch decoder: hits equal the CPU path's; a corrupt item in a
    SearchBatch fails alone with BadInput (the servicer's INVALID_ARGUMENT)."""
    import asyncio

    from hashret.engines import open_engine
    from serve.batcher import Batcher
    from serve.gallery import open_gallery
    from serve.service import RetrievalService
    from tests.test_fuzz import build_gallery, model_id_of, shared_exp

    exp = shared_exp(tmp_path_factory)
    gal = build_gallery(exp, tmp_path_factory.mktemp("gpu-decode") / "gal", n=12)

    async def answers(decoder):
        engine = open_engine(exp, "ort", "cpu")
        service = RetrievalService(
            engine, open_gallery(gal), model_id=model_id_of(exp), spec=SPEC, decoder=decoder,
            batcher=Batcher(engine.encode, max_batch=8, max_delay_us=500), decode_threads=8, rerank_factor=0)
        try:
            items = [(p, 5, None) for p in photos[:4]] + [(truncated(photos[5]), 5, None)]
            return await service.search_batch(items)
        finally:
            service.close()

    cpu = asyncio.run(answers(None))
    gpu = asyncio.run(answers(GpuDecoder(SPEC, "cpu", max_batch=8)))
    assert isinstance(gpu[4], BadInput) and "item 4 | corrupt or truncated image" in str(gpu[4])
    assert [[(h.id, h.distance) for h in r] for r in gpu[:4]] == [[(h.id, h.distance) for h in r] for r in cpu[:4]]


@needs_cuda
def test_cuda_batch_decode_parity_and_memory(photos):
    """nvJPEG: close to the CPU routine, a corrupt image fails alone, and no device memory is kept."""
    import torch

    with GpuDecoder(SPEC, "cuda", max_batch=32) as d:
        d.decode_batch(photos[:2])  # nvJPEG's handles and buffers: allocated once
        base = torch.cuda.memory_allocated()
        out = d.decode_batch(photos[:3] + [truncated(photos[3])] + photos[4:])
        assert out[3] is _FALLBACK and sum(o is _FALLBACK for o in out) == 1
        assert torch.cuda.memory_allocated() == base
        got = np.stack([o for o in out if o is not _FALLBACK])
        want = np.stack([load_image(p, SPEC) for n, p in enumerate(photos) if n != 3])
        assert np.abs(got.astype(int) - want.astype(int)).mean() < 2.0
