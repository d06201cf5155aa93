"""`hashret serve --decode cuda`: JPEGs decoded in batches by nvJPEG and resized on the GPU.

`GpuDecoder(spec, device)` is a drop-in for hashret.images.load_image in the server's decode
threads: each thread calls it with one image and blocks; a worker thread takes whatever images
are waiting (up to `max_batch`), decodes them in one `torchvision.io.decode_jpeg(list, device=...)`
call and resizes + crops each on the device with the CPU routine's geometry
(hashret.images.resize_geometry, including the size a large JPEG is drafted at). No timer: while
one batch is on the GPU the next one gathers, so batching adds no wait of its own.

Before anything reaches the GPU the caller's thread reads the JPEG header (markers only, no
pixels) and applies the limits: bytes, then width x height from the frame header. Images the
GPU path does not take go to the CPU routine on the caller's thread, unchanged:

* not a JPEG (by its magic bytes), or a header that does not parse;
* a frame other than baseline/extended/progressive Huffman (lossless, arithmetic, hierarchical),
  or samples that are not 8-bit;
* not exactly 3 components: grayscale, CMYK and YCCK (PIL's conversions are the reference);
* an Adobe APP14 marker saying the 3 components are RGB, not YCbCr;
* EXIF orientation other than 1 (the CPU routine turns the image upright);
* chroma sampling other than 4:4:4, 4:2:2, 4:4:0 or 4:2:0 (luma 1 or 2 per axis, chroma 1x1),
  baseline or progressive alike: nvJPEG's hardware and hybrid paths are built for these.

A batch that fails (a corrupt JPEG) is split in halves until the failing image is alone; that
image is then decoded by the CPU routine, whose BadInput (INVALID_ARGUMENT) is what the client
sees, the same error as with --decode cpu, and the rest of the batch is answered. A CUDA
out-of-memory error splits the batch the same way, and an image that does not fit alone is
decoded on the CPU: requests get slower, never refused. nvJPEG's IDCT and colour conversion are
not bit-exact with libjpeg's: `python -m serve.gpu_decode EXP` measures the code bit agreement
on the golden photos (see `parity`).
"""
from __future__ import annotations

import argparse
import json
import logging
import queue
import struct
import sys
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hashret.engines.base import torch_oom_errors
from hashret.errors import BadInput, HashretError, Unavailable, first_line
from hashret.images import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    PreprocessSpec,
    load_image,
    resize_geometry,
)
from serve import threadnames

log = logging.getLogger("hashret.serve.decode")

DECODE_CHOICES = "cpu, cuda or cuda:N"
_SOF = {0xC0: "baseline", 0xC1: "extended", 0xC2: "progressive"}
_OTHER_SOF = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_FALLBACK = object()  # a worker's answer: decode this one with the CPU routine


@dataclass
class JpegHeader:
    """What the markers before the first scan say; `reason` is why the GPU path will not take it."""

    width: int = 0
    height: int = 0
    reason: str | None = None
    frame: str = ""
    sampling: list[tuple[int, int]] = field(default_factory=list)


def _exif_orientation(seg: bytes) -> int | None:
    """Orientation (tag 0x0112) of IFD0 in an APP1 Exif segment body, None when it has none."""
    tiff = seg[6:]
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        raise ValueError("not a TIFF header")
    e = "<" if tiff[:2] == b"II" else ">"
    (ifd,) = struct.unpack_from(e + "I", tiff, 4)
    (n,) = struct.unpack_from(e + "H", tiff, ifd)
    for i in range(n):
        tag, typ, count, value = struct.unpack_from(e + "HHI4s", tiff, ifd + 2 + 12 * i)
        if tag == 0x0112:
            return struct.unpack_from(e + "H", value)[0] if typ == 3 else -1
    return None


def read_jpeg_header(data: bytes) -> JpegHeader:
    """Parse the JPEG markers up to the first scan (no pixels); `reason` set when the CPU must decode."""
    hdr = JpegHeader()
    if data[:3] != b"\xff\xd8\xff":
        hdr.reason = "not a JPEG"
        return hdr
    pos, orientation, adobe, frame = 2, None, None, None
    try:
        while pos + 4 <= len(data):
            if data[pos] != 0xFF:
                raise ValueError(f"no marker at byte {pos}")
            marker = data[pos + 1]
            if marker == 0xFF:  # fill byte
                pos += 1
                continue
            if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
                pos += 2
                continue
            if marker in (0xD9, 0xDA):  # end of image, start of scan: the header is over
                break
            (length,) = struct.unpack_from(">H", data, pos + 2)
            seg = data[pos + 4 : pos + 2 + length]
            if length < 2 or len(seg) != length - 2:
                raise ValueError(f"segment 0x{marker:02X} runs past the end")
            if marker == 0xE1 and seg[:6] == b"Exif\x00\x00" and orientation is None:
                orientation = _exif_orientation(seg)
            elif marker == 0xEE and seg[:5] == b"Adobe" and len(seg) >= 12:
                adobe = seg[11]
            elif marker in _SOF or marker in _OTHER_SOF:
                if frame is not None:
                    raise ValueError("two frame headers")
                frame = marker
                precision, height, width, ncomp = struct.unpack_from(">BHHB", seg, 0)
                hdr.width, hdr.height = width, height
                hdr.sampling = [(seg[7 + 3 * c] >> 4, seg[7 + 3 * c] & 15) for c in range(ncomp)]
                if marker in _OTHER_SOF:
                    hdr.reason = f"frame type SOF{marker - 0xC0} (lossless, arithmetic or hierarchical)"
                elif precision != 8:
                    hdr.reason = f"{precision}-bit samples"
                elif ncomp != 3:
                    hdr.reason = {1: "grayscale", 4: "CMYK/YCCK"}.get(ncomp, f"{ncomp} components")
            pos += 2 + length
    except (ValueError, struct.error, IndexError) as e:
        hdr.reason = f"header does not parse ({e})"
        return hdr
    if frame is None:
        hdr.reason = hdr.reason or "no frame header"
        return hdr
    hdr.frame = _SOF.get(frame, f"SOF{frame - 0xC0}")
    if hdr.reason:
        return hdr
    if hdr.width < 1 or hdr.height < 1:
        hdr.reason = f"size {hdr.width}x{hdr.height} in the frame header"
    elif adobe == 0:
        hdr.reason = "RGB-coded (Adobe transform 0)"
    elif orientation not in (None, 1):
        hdr.reason = f"EXIF orientation {orientation}"
    else:
        (lh, lv), chroma = hdr.sampling[0], hdr.sampling[1:]
        if lh not in (1, 2) or lv not in (1, 2) or any(s != (1, 1) for s in chroma):
            hdr.reason = f"chroma sampling {hdr.sampling}"
    return hdr


def draft_size(w: int, h: int, spec: PreprocessSpec) -> tuple[int, int]:
    """The size the CPU routine decodes a w x h JPEG at (Pillow's draft, libjpeg DCT scaling).

    hashret.images.load_image asks for a shorter side >= 2 * resize once the image is at least
    twice that; Pillow then picks the largest scale 1/8..1/1 that keeps both sides at least the
    asked size, and rounds up. The GPU path decodes at full size but resizes to the size the CPU
    routine computes from this one, so both crop the same box.
    """
    from hashret.images import _draft_size

    min_side = 2 * spec.resize
    if min(w, h) < 2 * min_side:
        return w, h
    rw, rh = _draft_size(w, h, min_side)
    ratio = min(w // rw, h // rh)
    a = next(s for s in (8, 4, 2, 1) if ratio >= s)
    return (w + a - 1) // a, (h + a - 1) // a


def cuda_device(device: str, what: str = "--decode"):
    """torch.device for `device` (cpu, cuda, cuda:N), refusing CUDA where torch sees none."""
    from serve.gallery.torch_index import resolve_device

    return resolve_device(device, what)


class DecodeCollector:
    """Prometheus view of the live pair's GpuDecoder counters, read at scrape time.

    `decoder_of()` returns the decoder now in use (it changes when a rollover promotes another
    pair), or None. Nothing is reported for a server that decodes on the CPU.
    """

    def __init__(self, decoder_of: Callable[[], GpuDecoder | None]):
        self._decoder_of = decoder_of

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        dec = self._decoder_of()
        if dec is None:
            return
        stats, reasons = dec.counters()
        images = CounterMetricFamily("hashret_decode_images", "images preprocessed by the GPU decoder's caller, "
                                     "by where they were decoded (device, or the CPU routine)", labels=["on"])
        images.add_metric(["device"], stats["gpu"])
        images.add_metric(["cpu"], stats["cpu"])
        yield images
        why = CounterMetricFamily("hashret_decode_cpu_fallbacks", "images sent to the CPU routine instead of the "
                                  "device decoder, by reason", labels=["reason"])
        for reason, n in sorted(reasons.items()):
            why.add_metric([reason], n)
        yield why
        yield CounterMetricFamily("hashret_decode_device_batches", "batches given to the device decoder",
                                  value=stats["batches"])
        yield CounterMetricFamily("hashret_decode_device_batch_splits", "device batches halved after a failure "
                                  "(an image the device refused, or out of memory)", value=stats["split"])


class GpuDecoder:
    """Decode + resize + crop of JPEGs on a torch device, batched across the calling threads.

    `device` "cpu" runs the same code on torchvision's CPU decoder: how it is tested without a GPU.
    """

    def __init__(self, spec: PreprocessSpec, device: str = "cuda", *, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_pixels: int = DEFAULT_MAX_PIXELS, max_batch: int = 32):
        import torch
        import torchvision  # noqa: F401  (fails here, at start, rather than on the first request)

        self.torch = torch
        self.spec = spec
        self.device = cuda_device(device, "--decode")
        self.max_bytes, self.max_pixels = int(max_bytes), int(max_pixels)
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise BadInput(f"max_batch {max_batch!r} | must be a positive integer")
        self.max_batch = max_batch
        self.stats = {"gpu": 0, "cpu": 0, "batches": 0, "split": 0}
        self.fallbacks: dict[str, int] = {}
        self._stats_lock = threading.Lock()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="hashret-gpu-decode", daemon=True)
        self._worker.start()

    # ---- the caller's side (any thread) ------------------------------------------------------
    def __call__(self, data: bytes, name: str = "image") -> np.ndarray:
        """uint8 [crop, crop, 3] of one encoded image, as load_image would give (BadInput if bad)."""
        why = self._gpu_refusal(data, name)
        if why is None:
            if self._closed:
                raise Unavailable(f"{name} | the GPU decoder is closed (the server is stopping)")
            fut: Future = Future()
            self._queue.put((data, fut))
            got = fut.result()
            if got is not _FALLBACK:
                self._count("gpu")
                return got
            why = "the GPU decode failed"
        self._count("cpu", why)
        return load_image(data, self.spec, max_bytes=self.max_bytes, max_pixels=self.max_pixels, name=name)

    def _gpu_refusal(self, data: bytes, name: str) -> str | None:
        """Limits (BadInput), then why this image goes to the CPU routine (None: to the GPU)."""
        if len(data) > self.max_bytes:
            raise BadInput(f"{name} | {len(data)} bytes exceeds the limit of {self.max_bytes} bytes")
        hdr = read_jpeg_header(data)
        if hdr.width and hdr.height and hdr.width * hdr.height > self.max_pixels:
            raise BadInput(f"{name} | {hdr.width}x{hdr.height} = {hdr.width * hdr.height} pixel count exceeds the "
                           f"limit of {self.max_pixels} (--max-pixels): downscale it")
        return hdr.reason

    def counters(self) -> tuple[dict[str, int], dict[str, int]]:
        """Copies of (stats, CPU fallbacks by reason), consistent with each other."""
        with self._stats_lock:
            return dict(self.stats), dict(self.fallbacks)

    def _count(self, key: str, why: str | None = None) -> None:
        with self._stats_lock:
            self.stats[key] += 1
            if why:
                # the reason's kind, not its numbers: a bounded set of keys
                kind = why.split(" (")[0].rstrip("0123456789 x[](),").strip() or why
                self.fallbacks[kind] = self.fallbacks.get(kind, 0) + 1

    # ---- the worker --------------------------------------------------------------------------
    def _run(self) -> None:
        threadnames.name_current()  # "hashret-gpu-dec": its CPU counts as decoding in bench serve
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # seen again after this batch: stop then
                    break
                batch.append(nxt)
            try:
                results = self.decode_batch([d for d, _ in batch])
            except BaseException as e:  # a bug of ours: answer every caller, keep the worker alive
                log.exception("GPU decode worker | batch of %d failed unexpectedly", len(batch))
                results = [_FALLBACK] * len(batch)
                if not isinstance(e, Exception):
                    raise
            for (_, fut), r in zip(batch, results):
                fut.set_result(r)

    def decode_batch(self, datas: list[bytes]) -> list:
        """Each image preprocessed on the device, or _FALLBACK for one the device could not do.

        Halves a failing batch until each failure is alone (log2(n) extra calls per bad image).
        """
        with self._stats_lock:
            self.stats["batches"] += 1
        try:
            return list(self._device_batch(datas))
        except Exception as e:
            oom = isinstance(e, torch_oom_errors())
            if len(datas) == 1 and not oom:
                log.info("GPU decode | image refused by the device decoder (%s): decoding it on the CPU",
                         first_line(e))
        # Out of the except block: the error's traceback held the failed attempt's tensors, so only
        # now does emptying the cache give their memory back before the halves run.
        if oom and self.device.type == "cuda":
            self.torch.cuda.empty_cache()
        if len(datas) == 1:
            return [_FALLBACK]
        with self._stats_lock:
            self.stats["split"] += 1
        half = len(datas) // 2
        return self.decode_batch(datas[:half]) + self.decode_batch(datas[half:])

    def _device_batch(self, datas: list[bytes]) -> np.ndarray:
        from torchvision.io import ImageReadMode, decode_jpeg

        torch = self.torch
        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        images = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device)
        crops = [self._resize_crop(img) for img in images]
        del images
        out = torch.stack(crops).permute(0, 2, 3, 1).contiguous()
        del crops
        return out.cpu().numpy() if self.device.type != "cpu" else out.numpy().copy()

    def _resize_crop(self, img):
        """hashret.images.resize_crop's output on the device: resize whole, then crop the same box."""
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        _, h, w = img.shape
        dw, dh = draft_size(w, h, self.spec)
        nw, nh, left, top = resize_geometry(dw, dh, self.spec)
        mode = InterpolationMode.BICUBIC if self.spec.interpolation == "bicubic" else InterpolationMode.BILINEAR
        r = F.resize(img, [nh, nw], interpolation=mode, antialias=True)
        c = self.spec.crop
        return r[:, top : top + c, left : left + c]

    def close(self) -> None:
        """Stop the worker after the images already queued; later calls are refused."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._worker.join(30)

    def __enter__(self) -> "GpuDecoder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---- parity: codes from GPU-decoded vs CPU-decoded golden photos ---------------------------------
def bit_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of equal bits between two packed code arrays of the same shape."""
    if a.shape != b.shape:
        raise BadInput(f"codes | shapes {a.shape} and {b.shape} differ")
    if a.size == 0:
        return 1.0
    return float(1.0 - np.unpackbits(a ^ b).sum() / (a.size * 8))


def parity(engine, spec: PreprocessSpec, files: list[bytes], device: str = "cuda", batch: int = 32) -> dict:
    """Codes of the same photos through the CPU routine and through GpuDecoder; the bit agreement.

    Also the pixel difference of the preprocessed images (mean and max absolute, in levels) and
    how many images the GPU path handed to the CPU, whose codes agree by construction.
    """
    from hashret.codes import pack

    cpu = np.stack([load_image(d, spec) for d in files])
    with GpuDecoder(spec, device, max_batch=batch) as dec:
        gpu = np.stack([dec(d, f"photo {n}") for n, d in enumerate(files)])
        stats, fallbacks = dict(dec.stats), dict(dec.fallbacks)
    ca = [engine.encode(cpu[a : a + batch]) for a in range(0, len(cpu), batch)]
    ga = [engine.encode(gpu[a : a + batch]) for a in range(0, len(gpu), batch)]
    cb, gb = pack(np.concatenate(ca)), pack(np.concatenate(ga))
    diff = np.abs(cpu.astype(np.int16) - gpu.astype(np.int16))
    return {
        "images": len(files), "device": device, "bits": int(cb.shape[1] * 8),
        "bit_agreement": round(bit_agreement(cb, gb), 6),
        "codes_identical": int((cb == gb).all(axis=1).sum()),
        "pixel_mean_abs_diff": round(float(diff.mean()), 4), "pixel_max_abs_diff": int(diff.max()),
        "decoded_on_device": stats["gpu"], "decoded_on_cpu": stats["cpu"], "cpu_reasons": fallbacks,
    }


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("exp", metavar="EXP", help="export folder whose golden photos are decoded both ways")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="dataset root the golden paths are relative to (default: the one in EXP/manifest.json)")
    p.add_argument("--device", default="cuda", help=f"where the batch path decodes: {DECODE_CHOICES} (default: cuda)")
    p.add_argument("--backend", default="ort", help="engine that encodes both sets of pixels (default: ort)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N golden photos (default: all)")
    p.add_argument("--batch", type=int, default=32, help="images per device decode call (default: 32)")
    p.add_argument("--out", default=None, metavar="JSON", help="also write the report to this file (default: print only)")


def run(args: argparse.Namespace) -> int:
    from hashret.engines import open_engine
    from hashret.manifest import load_manifest

    manifest = load_manifest(args.exp, kind="export")
    spec = PreprocessSpec.from_dict(manifest.get("preprocessing") or {})
    files = golden_files(args.exp, manifest, args.data, args.limit)
    engine = open_engine(args.exp, args.backend, "cpu")
    try:
        report = parity(engine, spec, files, args.device, args.batch)
    finally:
        engine.close()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def golden_files(exp: str | Path, manifest: dict, data: str | Path | None = None, limit: int | None = None) -> list[bytes]:
    """The original files of EXP's golden set: golden.npz keeps their paths relative to the data root."""
    # EXP's folder, not export's code: serve imports no other stage (tests/test_imports.py)
    path = Path(exp) / "golden.npz"
    if not path.is_file():
        raise BadInput(f"{path} | not found: export EXP with --golden N (the default) to have golden photos")
    with np.load(path, allow_pickle=False) as z:
        if "paths" not in z:
            raise BadInput(f"{path} | holds no photo paths: re-export EXP")
        rel = [str(p) for p in z["paths"]]
    root = data or (manifest.get("dataset") or {}).get("root")
    if not root:
        raise BadInput(f"{exp} | its manifest names no dataset root: pass --data")
    paths = [Path(root) / p for p in rel][: limit or None]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise BadInput(f"golden photo {missing[0]} | not found ({len(missing)} missing): pass --data with the "
                       f"dataset root EXP was exported from")
    return [p.read_bytes() for p in paths]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m serve.gpu_decode",
        description="Parity of --decode cuda: encode EXP's golden photos after CPU decoding and after the "
                    "batched device decode, and report the code bit agreement and pixel differences.")
    add_args(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except HashretError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
