"""Train stage: dataset readers, preprocessing, feature cache, head training, run folder, DDP."""
from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hashret.cli import main as cli
from hashret.datasets import SplitOptions, read_dataset
from hashret.errors import BadInput, MissingArtifact, Unavailable
from hashret.images import PreprocessSpec, decode_image, load_image
from hashret.manifest import load_manifest
from hashret.models import build_backbone, load_encoder

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- tiny datasets
def _img(path: Path, color, size=(40, 30), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


@pytest.fixture()
def digix(tmp_path):
    root = tmp_path / "train_data"
    lines = []
    for i in range(10):
        _img(root / "images" / f"{i}.jpg", (i * 20, 0, 0))
        lines.append(f"images/{i}.jpg,{i % 2}")
    (root / "label.txt").write_text("\n".join(lines) + "\n")
    return root


def test_digix_reader_splits_with_seed(digix):
    a = read_dataset(digix.parent, "digix", SplitOptions(query_fraction=0.3, seed=1))
    b = read_dataset(digix, "digix", SplitOptions(query_fraction=0.3, seed=1))
    assert a.sizes() == {"train": 7, "database": 7, "query": 3}
    assert [s.path for s in a.query] == [s.path for s in b.query]
    c = read_dataset(digix, "digix", SplitOptions(query_fraction=0.3, seed=2))
    assert a.fingerprint() == b.fingerprint()
    assert {s.label for s in a.train} <= {0, 1}
    assert c.sizes() == a.sizes()


@pytest.mark.parametrize(
    "line, match",
    [
        ("images/0.jpg;1", r"label.txt:11 \| malformed line"),
        ("images/0.jpg,cat", r"label.txt:11 \| label 'cat' is not an integer"),
        ("images/missing.jpg,1", r"label.txt:11 \| image .*missing.jpg not found"),
    ],
)
def test_digix_bad_lines_name_file_and_line(digix, line, match):
    with open(digix / "label.txt", "a") as f:
        f.write(line + "\n")
    with pytest.raises(BadInput, match=match):
        read_dataset(digix, "digix")
    skipped = read_dataset(digix, "digix", SplitOptions(skip_bad=True))
    assert len(skipped.skipped) == 1 and "label.txt:11" in skipped.skipped[0]
    assert sum(skipped.sizes()[k] for k in ("database", "query")) == 10


def test_folder_reader(tmp_path):
    for c in ("b_cls", "a_cls"):
        for i in range(3):
            _img(tmp_path / c / f"{i}.png", (i, 1, 2))
    s = read_dataset(tmp_path, "folder", SplitOptions(query_fraction=0.34))
    assert s.class_names == {0: "a_cls", 1: "b_cls"}
    assert len(s.database) + len(s.query) == 6 and len(s.query) == 2


def test_csv_reader_split_column_wins(tmp_path):
    for i in range(6):
        _img(tmp_path / "img" / f"{i}.jpg", (i, i, i))
    rows = ["path,label,split", "img/0.jpg,0,database", "img/1.jpg,1,database", "img/2.jpg,0,query",
            f"{tmp_path / 'img' / '3.jpg'},1,query", "img/4.jpg,0,database", "img/5.jpg,1,database"]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    s = read_dataset(tmp_path / "m.csv", "csv")
    assert s.sizes() == {"train": 4, "database": 4, "query": 2}  # no 'train' rows: database trains
    rows[1] = "img/0.jpg,0,train"
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    s = read_dataset(tmp_path / "m.csv", "csv")
    assert s.sizes() == {"train": 1, "database": 3, "query": 2}
    (tmp_path / "bad.csv").write_text("file,label\nimg/0.jpg,0\n")
    with pytest.raises(BadInput, match=r"bad.csv:1 \| header"):
        read_dataset(tmp_path / "bad.csv", "csv")


def test_grocery_reader_standard_protocol(grocery_root):
    s = read_dataset(grocery_root, "grocery")
    assert s.sizes() == {"train": 2936, "database": 2936, "query": 2485}
    assert len({x.label for x in s.query}) == 81
    # accepts dataset/ itself too
    assert read_dataset(grocery_root / "dataset", "grocery").fingerprint() == s.fingerprint()


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(MissingArtifact, match="no train.txt found"):
        read_dataset(tmp_path, "grocery")
    with pytest.raises(BadInput, match="unknown: choose one of csv, digix, folder, grocery"):
        read_dataset(tmp_path, "parquet")


# ----------------------------------------------------------------------------- preprocessing
def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_decode_modes_to_rgb():
    spec = PreprocessSpec(resize=32, crop=32)
    cases = {
        "cmyk": _encode(Image.new("CMYK", (50, 40), (0, 255, 255, 0)), "JPEG"),
        "16bit": _encode(Image.fromarray(np.full((40, 50), 65535, np.uint16)), "PNG"),
        "palette": _encode(Image.new("P", (50, 40), 3), "PNG"),
        "alpha": _encode(Image.new("RGBA", (50, 40), (255, 0, 0, 0)), "PNG"),
        "gray": _encode(Image.new("L", (50, 40), 128), "PNG"),
    }
    out = {k: load_image(v, spec) for k, v in cases.items()}
    for k, v in out.items():
        assert v.shape == (32, 32, 3) and v.dtype == np.uint8, k
    assert out["cmyk"][0, 0, 0] > 200 and out["cmyk"][0, 0, 1] < 60  # red
    assert out["16bit"].min() == 255  # full-scale 16-bit is white, not clipped garbage
    assert (out["alpha"] == 255).all()  # transparent composited on white


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (60, 30), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 30, 30))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    data = _encode(img, "JPEG", exif=exif)
    up = decode_image(data)
    assert up.size == (30, 60)
    arr = np.asarray(up)
    assert arr[:30].mean() > 200 and arr[30:].mean() < 50  # white ends up on top


def _photo(w: int, h: int) -> Image.Image:
    """A smooth colour field with mild noise: JPEG-like content at any size."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 127 // (w + h)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))


def test_large_jpegs_are_decoded_at_reduced_scale():
    """Phone-size JPEGs use libjpeg's DCT scaling down to 2x the resize target; the crop barely moves."""
    spec = PreprocessSpec(resize=64, crop=56)
    big = _encode(_photo(1200, 900), "JPEG", quality=92)
    assert decode_image(big).size == (1200, 900)
    assert decode_image(big, min_side=128).size == (300, 225)  # 1/4: shorter side 225 >= 128, 1/8 would be 113
    assert decode_image(big, min_side=500).size == (1200, 900)  # less than 2x the target: decoded whole
    assert decode_image(_encode(_photo(1200, 900), "PNG"), min_side=128).size == (1200, 900)  # JPEG only
    full = np.asarray(decode_image(big).resize((85, 64), Image.Resampling.BILINEAR)).astype(int)[4:60, 14:70]
    fast = load_image(big, spec).astype(int)
    assert np.abs(fast - full).mean() < 1.5  # same picture, resampled along a different path

    exif = Image.Exif()
    exif[0x0112] = 6  # portrait photo stored landscape, as phones do
    rotated = decode_image(_encode(_photo(1200, 900), "JPEG", exif=exif), min_side=128)
    assert rotated.size == (225, 300)


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "empty"),
        (b"not an image at all", "not a decodable image"),
        (_encode(Image.new("RGB", (64, 64), 1), "JPEG")[:200], "corrupt or truncated"),
    ],
)
def test_bad_images_are_refused(data, match):
    with pytest.raises(BadInput, match=match):
        decode_image(data, name="upload")


@pytest.mark.parametrize("side", [5000, 20000])  # under and over PIL's own bomb threshold
def test_decompression_bomb_is_refused(side):
    data = _encode(Image.new("1", (side, side)), "PNG")
    assert len(data) < 200_000
    with pytest.raises(BadInput, match="pixel count exceeds the limit"):
        decode_image(data, max_pixels=10_000_000)


def _png_header(w: int, h: int) -> bytes:
    """A valid-looking 1-bit PNG whose IHDR claims w x h (a few dozen bytes; never allocated here)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def _jpeg_header(w: int, h: int) -> bytes:
    """A baseline JPEG header (SOF0 claiming w x h, 3 components, SOS) with no real scan data."""
    import struct

    sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, h, w, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    sos = b"\xff\xda" + struct.pack(">HB", 12, 3) + b"\x01\x00\x02\x11\x03\x11\x00\x3f\x00"
    return b"\xff\xd8" + sof + sos + b"\0" * 16 + b"\xff\xd9"


# 9500x9500 and 10000x10000 lie between Pillow's warning limit (~89.5 MP) and its hard one
# (~179 MP); 30000x30000 and 60000x60000 are over both, where Pillow refuses before we see a size
@pytest.mark.parametrize("fmt, w, h", [("png", 10000, 10000), ("png", 30000, 30000),
                                       ("jpeg", 9500, 9500), ("jpeg", 60000, 60000)])
@pytest.mark.parametrize("max_pixels", [50_000_000, 12_345_678])
def test_pixel_limit_message_quotes_max_pixels_never_pillows(fmt, w, h, max_pixels):
    data = (_png_header if fmt == "png" else _jpeg_header)(w, h)
    assert len(data) < 100
    if w * h <= 2 * Image.MAX_IMAGE_PIXELS:  # Pillow reads the size back: the header is a real one
        with pytest.warns(Image.DecompressionBombWarning):
            assert Image.open(io.BytesIO(data)).size == (w, h)
    with pytest.raises(BadInput) as ei:
        decode_image(data, max_pixels=max_pixels, name="upload")
    msg = str(ei.value)
    assert msg.startswith("upload | ") and "pixel count exceeds the limit" in msg, msg
    assert f"of {max_pixels} (--max-pixels)" in msg and str(w * h) in msg, msg
    for pillows in (Image.MAX_IMAGE_PIXELS, 2 * Image.MAX_IMAGE_PIXELS):
        assert str(pillows) not in msg, msg
    assert "decompression bomb DOS" not in msg, msg


def test_crafted_headers_under_the_limit_reach_the_decoder():
    """The control for the test above: the same headers, small, are parsed (and fail only for lack of data)."""
    for data in (_png_header(500, 400), _jpeg_header(500, 400)):
        assert Image.open(io.BytesIO(data)).size == (500, 400)
        with pytest.raises(BadInput, match="corrupt or truncated"):
            decode_image(data, name="upload")


def test_max_pixels_above_what_pillow_decodes_says_so():
    """--max-pixels set past Pillow's hard limit: the refusal says to lower it, not that the image is allowed."""
    with pytest.raises(BadInput, match=r"900000000 pixels is more than the decoder accepts, although "
                                       r"--max-pixels is 1000000000: downscale it, and set --max-pixels to at most"):
        decode_image(_png_header(30000, 30000), max_pixels=1_000_000_000, name="upload")


# ----------------------------------------------------------------------------- backbones
def test_resnet50_weights_options(tmp_path):
    bb = build_backbone("resnet50", "none")
    path = tmp_path / "r50.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in bb.net.state_dict().items()}}, path)
    again = build_backbone("resnet50", str(path))
    assert torch.equal(again.net.conv1.weight, bb.net.conv1.weight)
    with pytest.raises(MissingArtifact, match="file not found"):
        build_backbone("resnet50", str(tmp_path / "nope.pth"))
    eff = build_backbone("efficientnet-lite0", "none").net.state_dict()
    torch.save(eff, tmp_path / "eff.pth")
    with pytest.raises(BadInput, match="does not fit this backbone"):
        build_backbone("resnet50", str(tmp_path / "eff.pth"))


def test_resnet50_imagenet_offline_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    try:
        build_backbone("resnet50", "imagenet")
    except Unavailable as e:
        assert "offline" in str(e) and "--weights PATH" in str(e)
    else:  # an online host downloads the weights: that is the documented behaviour too
        assert (tmp_path / "hub" / "checkpoints").is_dir()


# ----------------------------------------------------------------------------- training
def _subset_csv(grocery_root: Path, tmp: Path, per_class: int = 4, classes: int = 8) -> Path:
    """A small CSV manifest over real Grocery photos (paths absolute: nothing is copied)."""
    s = read_dataset(grocery_root, "grocery")
    rows, seen = ["path,label,split"], {}
    for split, samples in (("database", s.database), ("query", s.query)):
        for x in samples:
            if x.label < classes and seen.get((split, x.label), 0) < (per_class if split == "database" else 2):
                seen[(split, x.label)] = seen.get((split, x.label), 0) + 1
                rows.append(f"{x.path},{x.label},{split}")
    f = tmp / "subset.csv"
    f.write_text("\n".join(rows) + "\n")
    return f


@pytest.fixture(scope="module")
def subset(grocery_root, tmp_path_factory):
    return _subset_csv(grocery_root, tmp_path_factory.mktemp("subset"))


def _train(csv, out, cache, *extra):
    return cli(["train", "--data", str(csv), "--format", "csv", "--backbone", "efficientnet-lite0",
                "--bits", "16", "--epochs", "5", "--batch-size", "16", "--out", str(out),
                "--cache-dir", str(cache), "--no-progress", *extra])


def test_train_writes_a_complete_run_and_repeats_exactly(subset, tmp_path):
    cache = tmp_path / "cache"
    assert _train(subset, tmp_path / "a", cache, "--method", "dch") == 0
    m = load_manifest(tmp_path / "a", "run")
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    for key in ("mAP@all", "mAP@10", "precision@10", "precision@H<=2"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["feature_cache_hit"] is False
    assert m["bits"] == 16 and m["method"]["name"] == "dch" and m["backbone"]["name"] == "efficientnet-lite0"
    assert m["preprocessing"]["crop"] == 224 and len(m["dataset"]["fingerprint"]) == 64
    assert m["versions"]["torch"] and m["weights"] == "model.pt"
    for png in ("loss.png", "pr_curve.png"):
        assert (tmp_path / "a" / "plots" / png).stat().st_size > 1000
    # the registry-derived defaults record what the hand-written flags recorded before
    assert m["method"] == {"name": "dch", "gamma": 20.0, "quant_weight": 0.1, "eps": 1e-4}
    assert m["training"]["epochs"] == 5 and m["training"]["lr"] == 1e-3
    enc, _ = load_encoder(tmp_path / "a")
    with torch.no_grad():
        z = enc(torch.zeros(2, 224, 224, 3, dtype=torch.uint8))
    assert z.shape == (2, 16) and float(z.abs().max()) <= 1.0
    # second run: same seed, cached features, identical weights
    assert _train(subset, tmp_path / "b", cache, "--method", "dch") == 0
    again = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert again["feature_cache_hit"] is True
    assert again["weights_sha"] == metrics["weights_sha"]
    assert again["mAP@all"] == metrics["mAP@all"]


def test_train_hashnet_learns_something(subset, tmp_path):
    assert _train(subset, tmp_path / "h", tmp_path / "cache", "--method", "hashnet", "--epochs", "30") == 0
    metrics = json.loads((tmp_path / "h" / "metrics.json").read_text())
    assert metrics["mAP@all"] > 0.3  # 8 classes: chance is about 0.13
    m = load_manifest(tmp_path / "h", "run")
    assert m["method"] == {"name": "hashnet", "alpha": None, "beta_init": 1.0, "beta_gamma": 0.3,
                           "beta_power": 0.5, "beta_step": 1}
    assert m["training"]["epochs"] == 30 and m["training"]["lr"] == 3e-4


@pytest.mark.parametrize(
    "argv, epochs, lr, hparams",
    [
        ([], 60, 1e-3, {}),
        (["--method", "hashnet"], 100, 3e-4, {"beta_gamma": 0.3}),
        (["--method", "hashnet", "--beta-gamma", "0.1", "--alpha", "0.5", "--epochs", "7"], 7, 3e-4,
         {"alpha": 0.5, "beta_gamma": 0.1}),
        (["--method", "dch", "--gamma", "5", "--lr", "0.01"], 60, 0.01, {"gamma": 5.0}),
        (["--method", "csq"], 60, 1e-3, {}),
        (["--method", "csq", "--quant-weight", "0.01"], 60, 1e-3, {"quant_weight": 0.01}),  # a flag DCH shares
    ],
)
def test_method_defaults_and_hparams_come_from_the_loss(argv, epochs, lr, hparams):
    from hashret.cli import build_parser
    from train.train import loss_hparams, resolve_defaults

    args = build_parser("train").parse_args(["train", "--out", "x", *argv])
    resolve_defaults(args)
    assert (args.epochs, args.lr, loss_hparams(args)) == (epochs, lr, hparams)


def test_another_losss_flag_is_ignored_with_a_warning(caplog):
    from hashret.cli import build_parser
    from train.train import loss_hparams, resolve_defaults

    args = build_parser("train").parse_args(["train", "--out", "x", "--method", "hashnet", "--gamma", "5"])
    resolve_defaults(args)
    assert "gamma" not in loss_hparams(args)
    assert "--gamma | a hyper-parameter of dch, not of --method hashnet: ignored" in caplog.text


def test_train_bad_bits_and_unreadable_image(subset, tmp_path):
    assert _train(subset, tmp_path / "x", tmp_path / "c", "--bits", "12") == 2
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    lines = subset.read_text().splitlines()
    csv = tmp_path / "with_bad.csv"
    csv.write_text("\n".join(lines + [f"{bad},0,database"]) + "\n")
    assert _train(csv, tmp_path / "y", tmp_path / "c") == 2
    assert not (tmp_path / "y" / "manifest.json").exists()
    assert _train(csv, tmp_path / "z", tmp_path / "c", "--skip-bad") == 0
    m = load_manifest(tmp_path / "z", "run")
    assert any("broken.jpg" in s for s in m["dataset"]["skipped"])


def test_finetune_last_block_runs_on_cpu(subset, tmp_path):
    assert _train(subset, tmp_path / "ft", tmp_path / "cache", "--finetune", "last-block",
                  "--finetune-epochs", "1", "--limit", "12", "--epochs", "2") == 0
    m = load_manifest(tmp_path / "ft", "run")
    assert m["training"]["finetune"] == "last-block"
    base = build_backbone("efficientnet-lite0", "imagenet")
    enc, _ = load_encoder(tmp_path / "ft")
    last_conv = enc.backbone.trunk.m._conv_head.weight
    assert not torch.equal(last_conv, base.net.trunk.m._conv_head.weight)  # the last block moved
    assert torch.equal(enc.backbone.trunk.m._conv_stem.weight, base.net.trunk.m._conv_stem.weight)  # the rest did not


def test_torchrun_two_ranks_agree(subset, tmp_path):
    cache = tmp_path / "cache"
    assert _train(subset, tmp_path / "warm", cache) == 0  # fill the cache once
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as sock:  # torchrun's static rendezvous needs a concrete free port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(port),
           "-m", "hashret", "train", "--data", str(subset), "--format", "csv", "--bits", "16",
           "--epochs", "5", "--batch-size", "16", "--out", str(tmp_path / "ddp"), "--cache-dir", str(cache),
           "--no-progress", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shas = {line.split()[1]: line.split()[-1] for line in proc.stdout.splitlines() if line.startswith("rank ")}
    assert set(shas) == {"0/2", "1/2"}, proc.stdout
    assert shas["0/2"] == shas["1/2"]
    m = load_manifest(tmp_path / "ddp", "run")
    assert m["training"]["world_size"] == 2
