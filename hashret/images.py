"""The one decode + resize + crop routine shared by training, export, gallery building and serving.

Everything downstream of this module sees uint8 RGB arrays [H, W, 3] of the manifest's crop size;
normalization lives inside the exported graph so every backend gets identical input.
"""
from __future__ import annotations

import io
import math
import os
import re
import struct
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from hashret.errors import BadInput

# Limits that keep a hostile upload from exhausting memory; the server exposes them as flags.
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 50_000_000

_INTERPOLATION = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


@dataclass(frozen=True)
class PreprocessSpec:
    """How a backbone wants its pixels: shorter side to `resize`, center `crop`, then normalize.

    mean/std are in [0, 1] units and applied inside the model (see hashret.models.Normalize).
    """

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        try:
            return cls(
                resize=int(d["resize"]),
                crop=int(d["crop"]),
                mean=tuple(float(x) for x in d["mean"]),
                std=tuple(float(x) for x in d["std"]),
                interpolation=str(d.get("interpolation", "bilinear")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BadInput(f"preprocessing spec {d!r} | malformed ({e})") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: alpha composited on white, 16-bit scaled, palette/CMYK converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


def _draft_size(w: int, h: int, min_side: int) -> tuple[int, int]:
    """The smallest size a JPEG may be decoded at so that its shorter side stays >= min_side."""
    f = min_side / min(w, h)
    return max(1, math.ceil(w * f)), max(1, math.ceil(h * f))


def _too_many_pixels(label: str, n: int | None, max_pixels: int, size: tuple[int, int] | None = None) -> str:
    """The refusal of an image over the pixel limit, naming the flag that sets it (never Pillow's)."""
    desc = f"{size[0]}x{size[1]} = {n}" if size else str(n) if n else "its"
    if n is not None and n <= max_pixels:  # only when --max-pixels was set above what Pillow decodes at all
        return (f"{label} | {desc} pixels is more than the decoder accepts, although --max-pixels is {max_pixels}: "
                f"downscale it, and set --max-pixels to at most {2 * (Image.MAX_IMAGE_PIXELS or 0)}")
    return f"{label} | {desc} pixel count exceeds the limit of {max_pixels} (--max-pixels): downscale it"


def decode_image(
    source: bytes | str | os.PathLike,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
    min_side: int | None = None,
) -> Image.Image:
    """Decode bytes or a file into an EXIF-upright RGB image, refusing empty, corrupt or huge input.

    The first frame of animated images is used. Errors are BadInput naming `name` (or the path).
    With `min_side`, a JPEG at least twice that size is decoded at 1/2, 1/4 or 1/8 scale
    (libjpeg's DCT scaling) while its shorter side stays >= min_side: a 12 MP phone photo then
    costs a fraction of a full decode, and smaller images decode exactly as without it.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        label = name or "image"
    else:
        label = name or str(source)
        try:
            data = Path(source).read_bytes()
        except FileNotFoundError:
            raise BadInput(f"{label} | file not found") from None
        except OSError as e:
            raise BadInput(f"{label} | cannot read file ({e.strerror})") from None
    if not data:
        raise BadInput(f"{label} | empty (0 bytes)")
    if len(data) > max_bytes:
        raise BadInput(f"{label} | {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            # Pillow warns above its own fixed limit (~89.5 MP); `max_pixels` below is the limit
            # that decides, so a refusal names the one the operator can change
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w < 1 or h < 1:
                raise BadInput(f"{label} | has zero size ({w}x{h})")
            if w * h > max_pixels:
                raise BadInput(_too_many_pixels(label, w * h, max_pixels, (w, h)))
            img.seek(0)
            if min_side and img.format == "JPEG" and min(w, h) >= 2 * min_side:
                img.draft(None, _draft_size(w, h, min_side))
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # no copy when already upright
            return _to_rgb(img)
    except BadInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow refuses twice its limit (~179 MP) before handing back the size: read the count
        # from its message, and quote our limit, never Pillow's
        found = re.search(r"\((\d+) pixels\)", str(e))
        n = int(found.group(1)) if found else None
        raise BadInput(_too_many_pixels(label, n, max_pixels)) from None
    except UnidentifiedImageError:
        head = data[:8].hex()
        raise BadInput(f"{label} | not a decodable image (unknown format; first bytes {head})") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, MemoryError) as e:
        raise BadInput(f"{label} | corrupt or truncated image ({type(e).__name__}: {e})") from None


def resize_geometry(w: int, h: int, spec: PreprocessSpec) -> tuple[int, int, int, int]:
    """(resized width, resized height, crop left, crop top) of a w x h image: shorter side to
    spec.resize, centre crop spec.crop. The one geometry of resize_crop and serve.gpu_decode."""
    scale = spec.resize / min(w, h)
    nw, nh = max(spec.crop, round(w * scale)), max(spec.crop, round(h * scale))
    return nw, nh, (nw - spec.crop) // 2, (nh - spec.crop) // 2


def resize_crop(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Shorter side to spec.resize, center crop spec.crop x spec.crop, as uint8 [crop, crop, 3].

    Only the source box that lands in the crop is resampled, on the same sampling grid as
    resizing the whole image and then cropping: ~25% less work for the usual 256 -> 224, and a
    degenerate aspect ratio (a 60-byte 4000x1 PNG would otherwise resize to 1,024,000 x 256 =
    786 MB) costs no more than a square image. Pixels may differ from resize-then-crop by one
    level where the box's float rounding tips a filter weight (0-0.2% of pixels of downscaled
    photos; identical for square ones), hence train.features.FEATURE_VERSION 3.
    """
    w, h = img.size
    nw, nh, left, top = resize_geometry(w, h, spec)
    resample = _INTERPOLATION.get(spec.interpolation, Image.Resampling.BILINEAR)
    sx, sy = w / nw, h / nh
    box = (left * sx, top * sy, (left + spec.crop) * sx, (top + spec.crop) * sy)
    return np.asarray(img.resize((spec.crop, spec.crop), resample, box=box), dtype=np.uint8).copy()


def load_image(source, spec: PreprocessSpec, **limits) -> np.ndarray:
    """decode_image + resize_crop: the whole preprocessing for one image.

    Large JPEGs are decoded at reduced scale down to twice the resize target, which keeps the
    final antialiased resize doing most of the reduction (see decode_image's `min_side`).
    """
    return resize_crop(decode_image(source, min_side=2 * spec.resize, **limits), spec)
