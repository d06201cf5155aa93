"""Fuzzing image decoding and every RPC's request fields against a real `hashret serve` process.

Two layers:
* property-based tests (hypothesis) of hashret.images.decode_image / load_image in-process:
  random bytes, mutated and truncated files and generated valid images of every mode, format and
  EXIF orientation either decode to an RGB image of the model's input size or raise BadInput —
  never any other exception;
* a corpus-driven fuzzer against `hashret serve` started as a subprocess on 127.0.0.1 (so a crash
  in a decoder would show as a dead process, and its RSS is measured from /proc): every input gets
  its documented status code (the in-process decoder is the oracle for images), no call hangs
  past its deadline, and afterwards the process is alive, health is SERVING and its memory is bounded.

The top of this module also holds the small helpers the other reliability tests import
(test_soak, test_crash, test_artifacts, test_access): a tiny real ONNX export built once per
session, and a FAISS gallery built from synthetic images with `index_cli.build`.
"""
from __future__ import annotations

import io
import os
import random
import struct
import threading
import time
import zlib
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from benchmarks.soak import ServerProcess, rss_bytes, synthetic_images
from benchmarks.tiny_exp import build_tiny_exp
from hashret.errors import BadInput
from hashret.images import PreprocessSpec, decode_image, load_image

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "fuzz-token-0123456789"
BITS = 64
SPEC = PreprocessSpec()  # 256 -> 224, like the real backbones: realistic decode/resize cost
SC = grpc.StatusCode
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # PIL's warnings about the damaged files we feed it


# ======================================================================== shared helpers
def shared_exp(tmp_path_factory) -> Path:
    """The tiny export, built once per pytest session (cached under the session's basetemp)."""
    exp = tmp_path_factory.getbasetemp() / "reliability-tiny-exp"
    if not (exp / "manifest.json").is_file():
        build_tiny_exp(exp)
    return exp


def build_gallery(exp: Path, out: Path, n: int = 24, kind: str = "faiss-flat", seed: int = 1) -> Path:
    """A gallery of n synthetic JPEGs (ids item/000..), built like `hashret index build` does."""
    from serve.index_cli import build

    src = out.parent / f"{out.name}-images"
    src.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, data in enumerate(synthetic_images(n, (160, 120), seed=seed)):
        p = src / f"{i:03d}.jpg"
        p.write_bytes(data)
        paths.append(str(p))
    ids = [f"item/{i:03d}" for i in range(n)]
    build(exp, out, paths, ids, [{"n": str(i)} for i in range(n)], kind=kind, progress=False)
    return out


def model_id_of(exp: Path) -> str:
    import json

    from hashret.engines import model_id

    return model_id(json.loads((exp / "manifest.json").read_text()))


def encode_image(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def raw_png(width: int, height: int, bit_depth: int = 8, color_type: int = 0, rows: bytes | None = None) -> bytes:
    """A PNG written by hand: any header (huge, 0x0, 16-bit RGB) with `rows` as the image data."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(rows or b"\0"))
            + png_chunk(b"IEND", b""))


def gradient(w: int = 64, h: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1)
    arr = np.clip(arr + rng.integers(-20, 20, arr.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


# ======================================================================== corpus
MAX_IMAGE_BYTES = 1 << 20
MAX_MESSAGE_BYTES = (1 << 20) + (1 << 19)
MAX_PIXELS = 4_000_000
MAX_K = 100
MAX_BATCH_ITEMS = 8
DEADLINE = 30.0  # per call; generous: 2 CPU cores are shared with other work
LIMITS = {"max_bytes": MAX_IMAGE_BYTES, "max_pixels": MAX_PIXELS}


def _exif(orientation: int) -> Image.Exif:
    e = Image.Exif()
    e[0x0112] = orientation
    return e


def valid_images() -> dict[str, bytes]:
    """Valid but unusual encodings: each must be answered OK."""
    base = gradient(64, 48)
    out: dict[str, bytes] = {}
    for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM", "TGA", "ICO"):
        out[f"rgb-{fmt}"] = encode_image(base, fmt)
        out[f"1x1-{fmt}"] = encode_image(gradient(1, 1), fmt)
    gray = base.convert("L")
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(base.size))
    pal = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    arr16 = (np.asarray(gray, dtype=np.uint16) * 257).astype(np.uint16)
    out.update({
        "gray-JPEG": encode_image(gray, "JPEG"), "gray-PNG": encode_image(gray, "PNG"),
        "la-PNG": encode_image(base.convert("LA"), "PNG"),
        "rgba-PNG": encode_image(rgba, "PNG"), "rgba-WEBP": encode_image(rgba, "WEBP"),
        "rgba-TIFF": encode_image(rgba, "TIFF"),
        "palette-PNG": encode_image(pal, "PNG"), "palette-GIF": encode_image(pal, "GIF"),
        "palette-BMP": encode_image(pal, "BMP"),
        "palette-transparent-PNG": encode_image(pal, "PNG", transparency=0),
        "palette-transparent-GIF": encode_image(pal, "GIF", transparency=0),
        "cmyk-JPEG": encode_image(base.convert("CMYK"), "JPEG"),
        "cmyk-TIFF": encode_image(base.convert("CMYK"), "TIFF"),
        "16bit-gray-PNG": encode_image(Image.fromarray(arr16), "PNG"),
        "16bit-gray-TIFF": encode_image(Image.fromarray(arr16), "TIFF"),
        "32bit-int-TIFF": encode_image(Image.fromarray(arr16.astype(np.int32) * 3), "TIFF"),
        "float-TIFF": encode_image(Image.fromarray(np.asarray(gray, np.float32) / 255.0), "TIFF"),
        "bilevel-PNG": encode_image(base.convert("1"), "PNG"),
        "bilevel-BMP": encode_image(base.convert("1"), "BMP"),
        "16bit-rgb-PNG": raw_png(8, 4, 16, 2, b"".join(b"\0" + os.urandom(8 * 6) for _ in range(4))),
        "progressive-JPEG": encode_image(base, "JPEG", progressive=True, quality=5),
        "tall-1x3000-PNG": encode_image(gradient(1, 3000), "PNG"),
        "wide-3000x1-PNG": encode_image(gradient(3000, 1), "PNG"),
        "wide-3999x1-PNG": encode_image(gradient(3999, 1), "PNG"),
        "near-limit-1999x1999-PNG": encode_image(Image.new("L", (1999, 1999), 7), "PNG"),
    })
    frames = [gradient(40, 30, seed=s).convert("P", palette=Image.Palette.ADAPTIVE) for s in range(3)]
    out["animated-GIF"] = encode_image(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    rgb_frames = [gradient(40, 30, seed=s) for s in range(3)]
    out["animated-PNG"] = encode_image(rgb_frames[0], "PNG", save_all=True, append_images=rgb_frames[1:])
    try:
        out["animated-WEBP"] = encode_image(rgb_frames[0], "WEBP", save_all=True, append_images=rgb_frames[1:])
    except Exception:  # libwebp without mux support: not this test's business
        pass
    for o in range(1, 9):
        out[f"exif-orientation-{o}-JPEG"] = encode_image(gradient(40, 20, seed=o), "JPEG", exif=_exif(o))
        out[f"exif-orientation-{o}-PNG"] = encode_image(gradient(40, 20, seed=o), "PNG", exif=_exif(o))
    out["exif-orientation-99-JPEG"] = encode_image(gradient(40, 20), "JPEG", exif=_exif(99))  # bogus tag value
    return out


def _patch_jpeg_size(data: bytes, w: int, h: int) -> bytes:
    """Rewrite the frame header (SOF0/SOF2) of a JPEG to claim w x h."""
    b = bytearray(data)
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        i = b.find(marker)
        if i >= 0:
            b[i + 5:i + 9] = struct.pack(">HH", h, w)
            return bytes(b)
    raise AssertionError("no SOF marker")


def bad_images() -> dict[str, bytes]:
    """Inputs that must be refused with INVALID_ARGUMENT (never decoded to pixels)."""
    rng = random.Random(1234)
    jpeg = encode_image(gradient(), "JPEG")
    gif = encode_image(gradient(8, 8), "GIF")
    out: dict[str, bytes] = {
        "empty": b"",
        "one-byte": b"\xff",
        "text": b"this is not an image at all",
        "path-etc-passwd": b"/etc/passwd",
        "path-traversal": b"../../../../etc/passwd",
        "file-url": b"file:///etc/passwd",
        "too-many-bytes": jpeg + b"\0" * MAX_IMAGE_BYTES,
        # huge dimensions in tiny files (decompression bombs' headers)
        "bomb-PNG-30000x30000": raw_png(30000, 30000),
        "bomb-PNG-2001x2000": raw_png(2001, 2000),
        "bomb-PNG-65535x65535-rgba16": raw_png(65535, 65535, 16, 6),
        "bomb-JPEG-65500x65500": _patch_jpeg_size(jpeg, 65500, 65500),
        "bomb-GIF-65535x65535": gif[:6] + struct.pack("<HH", 65535, 65535) + gif[10:],
        "bomb-WEBP-16383x16383": (b"RIFF" + struct.pack("<I", 30) + b"WEBPVP8X" + struct.pack("<I", 10)
                                  + b"\x00\x00\x00\x00" + (16382).to_bytes(3, "little") * 2 + b"\0" * 4),
        "bomb-BMP-50000x50000": (b"BM" + struct.pack("<IHHI", 62, 0, 0, 62)
                                 + struct.pack("<IiiHHIIiiII", 40, 50000, 50000, 1, 1, 0, 0, 2835, 2835, 0, 0)
                                 + b"\0" * 8),
        "zero-size-PNG-0x0": raw_png(0, 0),
        "zero-size-PNG-0x10": raw_png(0, 10),
    }
    magic = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff\xe0", "gif": b"GIF89a", "webp": b"RIFF\0\0\0\0WEBPVP8 ",
             "bmp": b"BM", "tiff": b"II*\x00", "ico": b"\0\0\1\0"}
    for name, m in magic.items():
        out[f"magic-{name}-then-junk"] = m + bytes(rng.getrandbits(8) for _ in range(64))
        out[f"magic-{name}-only"] = m
    for n in (2, 7, 16, 100, 1000, 20000):
        for s in range(2):
            out[f"random-{n}-{s}"] = bytes(rng.getrandbits(8) for _ in range(n))
    return out


def damaged_images() -> dict[str, bytes]:
    """Truncated and bit-flipped files: the in-process decoder (the oracle) says OK or not."""
    rng = random.Random(99)
    base = gradient(96, 64)
    seeds = {
        "JPEG": encode_image(base, "JPEG"), "PNG": encode_image(base, "PNG"), "WEBP": encode_image(base, "WEBP"),
        "GIF": encode_image(base.convert("P"), "GIF"), "TIFF": encode_image(base, "TIFF"),
        "BMP": encode_image(base, "BMP"),
    }
    gif = seeds["GIF"]
    out = {"GIF-screen-0x0": gif[:6] + struct.pack("<HH", 0, 0) + gif[10:]}  # Pillow sizes it from the frame
    for fmt, data in seeds.items():
        for frac in (0.01, 0.1, 0.3, 0.5, 0.8, 0.95):
            out[f"truncated-{fmt}-{frac}"] = data[: max(1, int(len(data) * frac))]
        out[f"truncated-{fmt}-minus1"] = data[:-1]
        for m in range(4):
            b = bytearray(data)
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] = rng.getrandbits(8)
            out[f"bitflip-{fmt}-{m}"] = bytes(b)
    # corpus-driven mutation: every valid file, damaged three ways (bytes set, bytes cut, bytes inserted)
    for name, data in valid_images().items():
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.getrandbits(8)
        out[f"mutated-{name}"] = bytes(b)
        cut = rng.randrange(1, max(2, len(data)))
        out[f"cut-{name}"] = data[:cut] + data[cut + rng.randint(1, 64):]
        at = rng.randrange(len(data))
        out[f"inserted-{name}"] = data[:at] + bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 32))) + data[at:]
    return out


def oracle(data: bytes) -> SC:
    """What the server must answer for image bytes: OK when our decoder accepts them."""
    try:
        arr = load_image(data, SPEC, **LIMITS)
    except BadInput:
        return SC.INVALID_ARGUMENT
    assert arr.shape == (SPEC.crop, SPEC.crop, 3) and arr.dtype == np.uint8
    return SC.OK


# ======================================================================== in-process properties
def _decodes_or_bad_input(data: bytes) -> bool:
    """The decoder's contract: an RGB image of positive size, or BadInput. Anything else fails."""
    try:
        img = decode_image(data, **LIMITS)
    except BadInput:
        return False
    assert img.mode == "RGB" and img.width >= 1 and img.height >= 1
    assert load_image(data, SPEC, **LIMITS).shape == (SPEC.crop, SPEC.crop, 3)
    return True


SEED_FILES = None


def _seed_files() -> list[bytes]:
    global SEED_FILES
    if SEED_FILES is None:
        base = gradient(48, 40, seed=3)
        SEED_FILES = [encode_image(base, f) for f in ("JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP", "ICO", "TGA")]
        SEED_FILES.append(encode_image(base, "JPEG", exif=_exif(6)))
    return SEED_FILES


PROPERTY_COUNT = {"n": 0}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_decode_random_bytes_is_image_or_bad_input(data):
    PROPERTY_COUNT["n"] += 1
    _decodes_or_bad_input(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.integers(0, 8), cut=st.floats(0.0, 1.0),
       flips=st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 255)), max_size=8))
def test_decode_mutated_files_is_image_or_bad_input(which, cut, flips):
    PROPERTY_COUNT["n"] += 1
    data = bytearray(_seed_files()[which])
    for pos, value in flips:
        data[min(len(data) - 1, int(pos * len(data)))] = value
    _decodes_or_bad_input(bytes(data[: max(1, int(round(cut * len(data))))] if cut < 0.999 else data))


MODES_FORMATS = [
    ("RGB", "JPEG"), ("RGB", "PNG"), ("RGB", "WEBP"), ("RGB", "BMP"), ("RGB", "TIFF"), ("RGB", "GIF"),
    ("L", "JPEG"), ("L", "PNG"), ("LA", "PNG"), ("RGBA", "PNG"), ("RGBA", "WEBP"), ("RGBA", "TIFF"),
    ("P", "PNG"), ("P", "GIF"), ("CMYK", "JPEG"), ("CMYK", "TIFF"), ("I;16", "PNG"), ("I", "TIFF"),
    ("F", "TIFF"), ("1", "PNG"), ("1", "BMP"),
]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(w=st.integers(1, 300), h=st.integers(1, 300), mf=st.sampled_from(MODES_FORMATS),
       orientation=st.integers(1, 8), seed=st.integers(0, 1000))
def test_valid_images_decode_upright_at_model_size(w, h, mf, orientation, seed):
    """Every mode/format/orientation decodes to RGB; orientations 5-8 swap width and height."""
    PROPERTY_COUNT["n"] += 1
    mode, fmt = mf
    img = gradient(w, h, seed)
    if mode == "I;16":
        img = Image.fromarray((np.asarray(img.convert("L"), np.uint16) * 257).astype(np.uint16))
    elif mode == "I":
        img = Image.fromarray(np.asarray(img.convert("L"), np.int32) * 100)
    elif mode == "F":
        img = Image.fromarray(np.asarray(img.convert("L"), np.float32) / 255.0)
    elif mode == "P":
        img = img.convert("P", palette=Image.Palette.ADAPTIVE)
    else:
        img = img.convert(mode)
    kw = {"exif": _exif(orientation)} if fmt in ("JPEG", "PNG", "WEBP", "TIFF") else {}
    if fmt == "TIFF" and kw:
        kw = {"tiffinfo": {0x0112: orientation}}
    data = encode_image(img, fmt, **kw)
    out = decode_image(data, **LIMITS)
    assert out.mode == "RGB"
    swapped = kw and orientation >= 5
    assert out.size == ((h, w) if swapped else (w, h)), (mode, fmt, orientation, out.size)
    arr = load_image(data, SPEC, **LIMITS)
    assert arr.shape == (SPEC.crop, SPEC.crop, 3) and arr.dtype == np.uint8


def test_extreme_aspect_ratio_does_not_blow_up_memory():
    """A 60-byte PNG of 4000x1 px must not make resize allocate a 1,024,000 x 256 intermediate (786 MB)."""
    import subprocess
    import sys

    code = (
        "import resource, struct, zlib\n"
        "from hashret.images import PreprocessSpec, load_image\n"
        "from tests.test_fuzz import raw_png\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "for w, h in ((4000, 1), (1, 4000), (3_999_999, 1)):\n"
        "    a = load_image(raw_png(w, h, rows=b''.join(b'\\0' + bytes(w) for _ in range(h))), PreprocessSpec(),\n"
        "                   max_pixels=4_000_000)\n"
        "    assert a.shape == (224, 224, 3)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    grew_mb = int(out.stdout.split()[-1])
    assert grew_mb < 100, f"decoding three degenerate images grew peak RSS by {grew_mb} MB"


@pytest.mark.parametrize("w,h", [(348, 348), (348, 464), (464, 348), (1290, 991), (1500, 40)])
def test_crop_box_resize_matches_resize_then_crop(w, h):
    """resize_crop samples only the crop, on the grid of a full resize + crop: same pixels up to float rounding."""
    from hashret.images import resize_crop

    img = gradient(w, h, seed=4)
    scale = SPEC.resize / min(w, h)
    nw, nh = max(SPEC.crop, round(w * scale)), max(SPEC.crop, round(h * scale))
    full = np.asarray(img.resize((nw, nh), Image.Resampling.BILINEAR), dtype=np.int16)
    left, top = (nw - SPEC.crop) // 2, (nh - SPEC.crop) // 2
    ref = full[top:top + SPEC.crop, left:left + SPEC.crop]
    got = resize_crop(img, SPEC).astype(np.int16)
    assert np.abs(got - ref).max() <= 1
    assert (got != ref).mean() < 0.005


# ======================================================================== the server
class RssSampler:
    """Peak RSS of a process, sampled every 20 ms in a thread."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid) or 0)
            self._stop.wait(0.02)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    exp = shared_exp(tmp_path_factory)
    gal = build_gallery(exp, tmp_path_factory.mktemp("fuzz") / "gal")
    srv = ServerProcess(exp, gal, [
        "--max-image-bytes", MAX_IMAGE_BYTES, "--max-message-bytes", MAX_MESSAGE_BYTES,
        "--max-pixels", MAX_PIXELS, "--max-k", MAX_K, "--max-batch-items", MAX_BATCH_ITEMS,
        "--decode-threads", 2, "--engine-threads", 1, "--log-format", "text",
    ], token=TOKEN)
    srv.start()
    try:
        yield srv
    finally:
        code = srv.stop()
        log = srv.log_text()
        srv.cleanup()
        assert code == 0, f"server exit code {code}:\n{log[-3000:]}"


@pytest.fixture(scope="module")
def stub(fuzz_server):
    from serve._proto import retrieval_pb2_grpc as pb_grpc

    opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(fuzz_server.addr, options=opts) as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        yield pb_grpc.RetrievalStub(ch), ch


AUTH = (("authorization", f"Bearer {TOKEN}"),)


class Tally:
    """Counts inputs sent and collects mismatches (reported together, with the count)."""

    def __init__(self):
        self.n = 0
        self.by_code: dict[str, int] = {}
        self.failures: list[str] = []

    def call(self, fn, request, expected, what: str, metadata=(), words: str | None = None):
        self.n += 1
        t = time.monotonic()
        try:
            resp = fn(request, timeout=DEADLINE, metadata=metadata)
            code, details = SC.OK, ""
        except grpc.RpcError as e:
            resp, code, details = None, e.code(), e.details() or ""
        elapsed = time.monotonic() - t
        self.by_code[code.name] = self.by_code.get(code.name, 0) + 1
        exp = expected if isinstance(expected, (set, frozenset)) else {expected}
        if code not in exp:
            self.failures.append(f"{what}: got {code.name} ({details[:160]}), expected {sorted(c.name for c in exp)}")
        elif words and words not in details:
            self.failures.append(f"{what}: {code.name} without {words!r} in {details[:160]!r}")
        # a hang bound, not a speed check: gRPC cancels the call at DEADLINE, so only a call whose
        # deadline never fired (a client or channel that hung) is still going at twice that
        if elapsed > 2 * DEADLINE:
            self.failures.append(f"{what}: took {elapsed:.1f} s, twice its {DEADLINE} s deadline: the call hung")
        return resp, code, details


def _health(addr: str) -> str:
    from serve.client import RetrievalClient

    with RetrievalClient(addr, timeout=10) as c:
        return c.health()


def test_corpus_fuzz_against_server(fuzz_server, stub):
    from serve._proto import retrieval_pb2 as pb

    s, ch = stub
    tally = Tally()
    valid, bad, damaged = valid_images(), bad_images(), damaged_images()
    rss_before = fuzz_server.rss()
    t_start = time.monotonic()
    with RssSampler(fuzz_server.pid) as sampler:
        # ---- images through Search, and a share through Encode / SearchBatch / Upsert
        for group, corpus in (("valid", valid), ("bad", bad), ("damaged", damaged)):
            for name, data in corpus.items():
                exp = SC.INVALID_ARGUMENT if len(data) > MAX_IMAGE_BYTES else oracle(data)
                if group == "valid":
                    assert exp == SC.OK, f"oracle refuses valid image {name}"
                if group == "bad":
                    assert exp == SC.INVALID_ARGUMENT, f"oracle accepts bad input {name}"
                tally.call(s.Search, pb.SearchRequest(image=data, k=3), exp, f"Search {group}/{name}")
                if hash(name) % 3 == 0 or group == "bad":
                    tally.call(s.Encode, pb.EncodeRequest(image=data), exp, f"Encode {group}/{name}")
        names = list(valid) + list(bad)
        for i in range(0, len(names), MAX_BATCH_ITEMS):  # SearchBatch: per-item codes
            chunk = names[i:i + MAX_BATCH_ITEMS]
            datas = [valid.get(n, bad.get(n)) for n in chunk]
            resp, code, _ = tally.call(s.SearchBatch, pb.SearchBatchRequest(
                items=[pb.SearchRequest(image=d, k=2) for d in datas]), SC.OK, f"SearchBatch {chunk[0]}..")
            if resp is not None:
                for n, d, r in zip(chunk, datas, resp.results):
                    got = SC.OK if r.WhichOneof("result") == "hits" else getattr(SC, r.error.status)
                    want = SC.INVALID_ARGUMENT if len(d) > MAX_IMAGE_BYTES else oracle(d)
                    if got != want:
                        tally.failures.append(f"SearchBatch item {n}: {got.name}, expected {want.name}")
        for name in list(bad)[:12] + list(valid)[:6]:
            data = valid.get(name, bad.get(name))
            exp = SC.OK if name in valid else SC.INVALID_ARGUMENT
            tally.call(s.Upsert, iter([pb.UpsertItem(id=f"fuzz/{name}", image=data)]), exp, f"Upsert {name}",
                       metadata=AUTH)

        # ---- Search fields: k and max_distance at and beyond their ranges
        img = valid["rgb-JPEG"]
        for k, exp in ((0, SC.INVALID_ARGUMENT), (1, SC.OK), (MAX_K, SC.OK), (MAX_K + 1, SC.INVALID_ARGUMENT),
                       (10**9, SC.INVALID_ARGUMENT), (2**32 - 1, SC.INVALID_ARGUMENT)):
            tally.call(s.Search, pb.SearchRequest(image=img, k=k), exp, f"Search k={k}")
        for md, exp in ((0, SC.OK), (BITS, SC.OK), (BITS + 1, SC.INVALID_ARGUMENT),
                        (10**9, SC.INVALID_ARGUMENT), (2**32 - 1, SC.INVALID_ARGUMENT)):
            tally.call(s.Search, pb.SearchRequest(image=img, k=5, max_distance=md), exp, f"Search max_distance={md}")
        with pytest.raises(ValueError):  # uint32 fields: a negative k cannot even be built...
            pb.SearchRequest(image=img, k=-1)
        # ...but can be sent on the wire: a 10-byte varint of -1 decodes as 2**32-1 on the server
        raw_search = ch.unary_unary("/hashret.v1.Retrieval/Search")
        neg = b"\xff" * 9 + b"\x01"
        body = pb.SearchRequest(image=img).SerializeToString()
        tally.call(raw_search, body + b"\x10" + neg, SC.INVALID_ARGUMENT, "Search raw k=-1", words="k ")
        tally.call(raw_search, body + b"\x10\x03\x18" + neg, SC.INVALID_ARGUMENT, "Search raw max_distance=-1",
                   words="max_distance")

        # ---- SearchBatch shapes
        tally.call(s.SearchBatch, pb.SearchBatchRequest(), SC.OK, "SearchBatch empty")
        tally.call(s.SearchBatch, pb.SearchBatchRequest(items=[pb.SearchRequest(image=img, k=1)] * (MAX_BATCH_ITEMS + 1)),
                   SC.INVALID_ARGUMENT, "SearchBatch too many items")
        resp, _, _ = tally.call(s.SearchBatch, pb.SearchBatchRequest(items=[
            pb.SearchRequest(image=img, k=0), pb.SearchRequest(image=img, k=2),
            pb.SearchRequest(image=img, k=2, max_distance=BITS + 1)]), SC.OK, "SearchBatch mixed k")
        if resp is not None:
            kinds = [r.WhichOneof("result") for r in resp.results]
            if kinds != ["error", "hits", "error"]:
                tally.failures.append(f"SearchBatch mixed k: per-item results {kinds}")

        # ---- Upsert fields
        code8 = b"\x5a" * (BITS // 8)
        upserts = {
            "empty stream": ([], SC.INVALID_ARGUMENT),
            "empty id": ([pb.UpsertItem(id="", code=code8)], SC.INVALID_ARGUMENT),
            "duplicate ids": ([pb.UpsertItem(id="dup", code=code8)] * 2, SC.INVALID_ARGUMENT),
            "id 513 bytes": ([pb.UpsertItem(id="x" * 513, code=code8)], SC.INVALID_ARGUMENT),
            "id 171 x 3-byte chars": ([pb.UpsertItem(id="\u20ac" * 171, code=code8)], SC.INVALID_ARGUMENT),
            "id 100k chars": ([pb.UpsertItem(id="y" * 100_000, code=code8)], SC.INVALID_ARGUMENT),
            "id 512 bytes": ([pb.UpsertItem(id="z" * 512, code=code8)], SC.OK),
            "id unicode+NUL": ([pb.UpsertItem(id="s\u00e9\u6f22\U0001F600\x00end", code=code8)], SC.OK),
            "id path-like": ([pb.UpsertItem(id="../../etc/passwd", code=code8),
                              pb.UpsertItem(id="/etc/shadow", code=code8)], SC.OK),
            "code 0 bytes": ([pb.UpsertItem(id="c0", code=b"")], SC.INVALID_ARGUMENT),
            "code 7 bytes": ([pb.UpsertItem(id="c7", code=code8[:7])], SC.INVALID_ARGUMENT),
            "code 9 bytes": ([pb.UpsertItem(id="c9", code=code8 + b"\0")], SC.INVALID_ARGUMENT),
            "no content": ([pb.UpsertItem(id="nothing")], SC.INVALID_ARGUMENT),
            "empty image": ([pb.UpsertItem(id="e", image=b"")], SC.INVALID_ARGUMENT),
            "metadata too big": ([pb.UpsertItem(id="m", code=code8, metadata={"k": "v" * 20000})], SC.INVALID_ARGUMENT),
            "metadata empty key": ([pb.UpsertItem(id="m2", code=code8, metadata={"": "v"})], SC.INVALID_ARGUMENT),
            "bad item after good": ([pb.UpsertItem(id="good", code=code8), pb.UpsertItem(id="bad", image=b"junk")],
                                    SC.INVALID_ARGUMENT),
        }
        for what, (items, exp) in upserts.items():
            tally.call(s.Upsert, iter(items), exp, f"Upsert {what}", metadata=AUTH)
        size = s.Info(pb.InfoRequest(), timeout=DEADLINE).gallery.size
        tally.call(s.Delete, pb.DeleteRequest(ids=["good"]), SC.NOT_FOUND, "all-or-nothing: 'good' was not written",
                   metadata=AUTH)

        # ---- Delete fields
        for what, ids, exp in (("no ids", [], SC.INVALID_ARGUMENT), ("empty id", [""], SC.INVALID_ARGUMENT),
                               ("duplicates", ["a", "a"], SC.INVALID_ARGUMENT),
                               ("id 513 bytes", ["x" * 513], SC.INVALID_ARGUMENT),
                               ("unknown", ["no/such/id"], SC.NOT_FOUND),
                               ("known + unknown", ["z" * 512, "no/such/id"], SC.NOT_FOUND)):
            tally.call(s.Delete, pb.DeleteRequest(ids=ids), exp, f"Delete {what}", metadata=AUTH)
        tally.call(s.Delete, pb.DeleteRequest(ids=["z" * 512]), SC.OK, "Delete known", metadata=AUTH)
        after = s.Info(pb.InfoRequest(), timeout=DEADLINE).gallery.size
        if after != size - 1:
            tally.failures.append(f"gallery size {size} -> {after} after one delete (all-or-nothing broken?)")

        # ---- oversized messages (above --max-message-bytes): RESOURCE_EXHAUSTED
        big = b"\xff" * (MAX_MESSAGE_BYTES + 1024)
        tally.call(s.Search, pb.SearchRequest(image=big, k=1), SC.RESOURCE_EXHAUSTED, "Search oversized")
        tally.call(s.Encode, pb.EncodeRequest(image=big), SC.RESOURCE_EXHAUSTED, "Encode oversized")
        tally.call(s.SearchBatch, pb.SearchBatchRequest(items=[pb.SearchRequest(image=big[: MAX_MESSAGE_BYTES // 2], k=1)] * 3),
                   SC.RESOURCE_EXHAUSTED, "SearchBatch oversized")
        tally.call(s.Upsert, iter([pb.UpsertItem(id="big", image=big)]), SC.RESOURCE_EXHAUSTED, "Upsert oversized",
                   metadata=AUTH)
        tally.call(s.Delete, pb.DeleteRequest(ids=["i" * 500] * 4000), SC.RESOURCE_EXHAUSTED, "Delete oversized",
                   metadata=AUTH)

        # ---- malformed protobuf on the wire: INVALID_ARGUMENT, not UNKNOWN
        rng = random.Random(7)
        garbage = [b"\xff\xff\xff", b"\x0a\xff", b"\x12\x05abc", b"\x08", b"\x0a\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80"]
        garbage += [bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64))) for _ in range(6)]
        for method in ("Search", "SearchBatch", "Encode", "Delete", "Info"):
            call = ch.unary_unary(f"/hashret.v1.Retrieval/{method}")
            for n, g in enumerate(garbage):
                try:
                    pb_type = {"Search": pb.SearchRequest, "SearchBatch": pb.SearchBatchRequest,
                               "Encode": pb.EncodeRequest, "Delete": pb.DeleteRequest, "Info": pb.InfoRequest}[method]
                    pb_type.FromString(g)
                    continue  # random bytes that happen to parse: covered by the field tests
                except Exception:
                    pass
                tally.call(call, g, SC.INVALID_ARGUMENT, f"{method} garbage #{n}", metadata=AUTH)
        up = ch.stream_unary("/hashret.v1.Retrieval/Upsert")
        tally.call(up, iter([b"\xff\xff\xff"]), SC.INVALID_ARGUMENT, "Upsert garbage item", metadata=AUTH)

    elapsed = time.monotonic() - t_start
    rss_after = fuzz_server.rss()
    alive = fuzz_server.alive()
    health = _health(fuzz_server.addr) if alive else "DEAD"
    growth = (rss_after - rss_before) / 2**20 if alive else float("nan")
    peak = (sampler.peak - rss_before) / 2**20
    summary = (f"fuzz: {tally.n} inputs to the server in {elapsed:.1f} s, codes {tally.by_code}; "
               f"server RSS {rss_before / 2**20:.0f} MB -> {rss_after / 2**20 if rss_after else 0:.0f} MB "
               f"(growth {growth:+.0f} MB, peak {peak:+.0f} MB); health {health}")
    print("\n" + summary)
    assert not tally.failures, summary + "\n" + "\n".join(tally.failures[:40])
    assert alive and health == "SERVING", summary + "\n" + fuzz_server.log_text()[-3000:]
    assert growth < 300, summary
    assert peak < 600, summary
    assert tally.n >= 250, summary


def test_real_photos_and_their_damaged_copies(fuzz_server, stub, grocery_root):
    """Grocery photos (real JPEG encoders, EXIF, sizes) and truncated / bit-flipped copies of them."""
    from hashret.datasets import read_dataset
    from serve._proto import retrieval_pb2 as pb

    s, _ = stub
    splits = read_dataset(grocery_root, "grocery")
    photos = [Path(x.path).read_bytes() for x in splits.query[:: max(1, len(splits.query) // 6)][:6]]
    rng = random.Random(5)
    tally = Tally()
    for n, data in enumerate(photos):
        flipped = bytearray(data)
        for _ in range(8):
            flipped[rng.randrange(200, len(flipped))] = rng.getrandbits(8)
        for what, d in (("photo", data), ("half", data[: len(data) // 2]), ("head", data[:600]),
                        ("flipped", bytes(flipped))):
            want = SC.INVALID_ARGUMENT if len(d) > MAX_IMAGE_BYTES else oracle(d)
            if what == "photo":
                assert want == SC.OK
            tally.call(s.Search, pb.SearchRequest(image=d, k=3), want, f"grocery #{n} {what}")
    print(f"\nreal photos: {tally.n} inputs, codes {tally.by_code}")
    assert not tally.failures, f"{tally.n} inputs: " + "\n".join(tally.failures)
    assert _health(fuzz_server.addr) == "SERVING"


# ---- property-based tests against the live server -----------------------------------------
SERVER_COUNT = {"n": 0}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(k=st.one_of(st.integers(0, MAX_K + 2), st.integers(0, 2**32 - 1)),
       md=st.one_of(st.none(), st.integers(0, BITS + 2), st.integers(0, 2**32 - 1)))
def test_search_k_and_max_distance_property(stub, k, md):
    from serve._proto import retrieval_pb2 as pb

    s, _ = stub
    SERVER_COUNT["n"] += 1
    req = pb.SearchRequest(image=IMG_FOR_PROPS, k=k)
    if md is not None:
        req.max_distance = md
    ok = 1 <= k <= MAX_K and (md is None or md <= BITS)
    try:
        hits = s.Search(req, timeout=DEADLINE).hits  # re-ranked (the default): best score first
        assert ok, f"k={k} max_distance={md} accepted"
        assert len(hits) <= k and all(md is None or h.distance <= md for h in hits)
        scores = [h.score for h in hits if h.HasField("score")]
        assert scores == sorted(scores, reverse=True)
        req.rerank_factor = 0  # Hamming order alone: distances ascending
        hits = s.Search(req, timeout=DEADLINE).hits
        assert len(hits) <= k and all(md is None or h.distance <= md for h in hits)
        assert [h.distance for h in hits] == sorted(h.distance for h in hits)
    except grpc.RpcError as e:
        assert not ok and e.code() == SC.INVALID_ARGUMENT, (k, md, e.code(), e.details())


IMG_FOR_PROPS = encode_image(gradient(80, 60, seed=5), "JPEG")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=512),
                      st.builds(lambda cut, b: b[:cut], st.integers(1, 2000),
                                st.sampled_from([encode_image(gradient(30, 20), f) for f in ("JPEG", "PNG", "GIF")]))))
def test_encode_bytes_property(stub, data):
    from serve._proto import retrieval_pb2 as pb

    s, _ = stub
    SERVER_COUNT["n"] += 1
    want = oracle(data) if data else SC.INVALID_ARGUMENT
    try:
        r = s.Encode(pb.EncodeRequest(image=data), timeout=DEADLINE)
        assert want == SC.OK and len(r.code) == BITS // 8 and r.bits == BITS
    except grpc.RpcError as e:
        assert e.code() == want == SC.INVALID_ARGUMENT, (e.code(), e.details())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.one_of(st.text(max_size=40), st.text(min_size=500, max_size=600)), max_size=6))
def test_delete_ids_property(stub, ids):
    from serve._proto import retrieval_pb2 as pb

    s, _ = stub
    SERVER_COUNT["n"] += 1
    bad = not ids or len(set(ids)) != len(ids) or any(not i or len(i.encode()) > 512 for i in ids)
    existing = any(i.startswith(("item/", "fuzz/", "prop/")) or i in ("../../etc/passwd", "/etc/shadow") for i in ids)
    if existing:
        return
    with pytest.raises(grpc.RpcError) as ei:
        s.Delete(pb.DeleteRequest(ids=ids), timeout=DEADLINE, metadata=AUTH)
    assert ei.value.code() == (SC.INVALID_ARGUMENT if bad else SC.NOT_FOUND), (ids, ei.value.details())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=st.lists(st.tuples(st.text(max_size=20), st.integers(0, 10),
                                st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3)),
                      max_size=4))
def test_upsert_items_property(stub, items):
    from serve._proto import retrieval_pb2 as pb

    s, _ = stub
    SERVER_COUNT["n"] += 1
    ids = [i for i, _, _ in items]
    ok = (bool(items) and len(set(ids)) == len(ids) and all(ids)
          and all(n == BITS // 8 for _, n, _ in items) and all(all(md) for _, _, md in items))
    msgs = [pb.UpsertItem(id=f"prop/{i}" if i else "", code=bytes(n), metadata=md) for i, n, md in items]
    try:
        r = s.Upsert(iter(msgs), timeout=DEADLINE, metadata=AUTH)
        assert ok and r.count == len(items), items
    except grpc.RpcError as e:
        assert not ok and e.code() == SC.INVALID_ARGUMENT, (items, e.code(), e.details())


def test_server_survived_everything(fuzz_server):
    """After every fuzz test of this module: alive, SERVING, bounded memory."""
    n = SERVER_COUNT["n"] + PROPERTY_COUNT["n"]
    rss = fuzz_server.rss()
    msg = (f"{n} property-based inputs (+ the corpus above); server alive={fuzz_server.alive()} "
           f"RSS={(rss or 0) / 2**20:.0f} MB")
    print("\n" + msg)
    log = fuzz_server.log_text()
    assert fuzz_server.alive(), msg + log[-3000:]
    assert _health(fuzz_server.addr) == "SERVING", msg
    # every input was answered as bad input, never as an internal error with a traceback
    assert "Traceback" not in log and "INTERNAL" not in log, msg + "\n" + log[-3000:]
    assert rss is not None and rss < 1.5 * 2**30, msg
