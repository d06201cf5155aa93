"""RUN -> model.onnx: uint8 images [N, H, W, 3] in, float32 tanh codes [N, bits] out.

The graph holds normalization and tanh but no Sign, so every backend's raw activations can be
compared with the torch reference (bit agreement, and how close to 0 each one is). Export uses
torch's dynamo exporter (torch.export; the default since torch 2.9: a clean graph, with
efficientnet-lite0's static same-padding folded into the convs), falling back to the legacy
TorchScript exporter if it fails. The file is saved self-contained (weights inside, no
.onnx.data) with the exporter's per-node source paths stripped, so the same run exported from
another checkout yields the same bytes and the same model id.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hashret.errors import CheckFailed, Unavailable
from hashret.fsutil import atomic_write

from export.formats import arg_group

if TYPE_CHECKING:  # annotations only: build steps are handed a job, they never make one
    from export.job import ExportJob

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
INPUT, OUTPUT = "images", "codes"
SLIM_ATOL = 1e-5
MAX_BATCH_DIM = 4096  # upper bound torch.export needs for the dynamic batch dimension


def test_batch(size: int, n: int = 3, seed: int = 0) -> np.ndarray:
    """Seeded uint8 noise images: enough to tell a broken graph from a faithful one."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _export(encoder, example, path: Path, opset: int, exporter: str) -> str:
    import torch

    kw = dict(input_names=[INPUT], output_names=[OUTPUT], opset_version=opset)
    if exporter in ("auto", "dynamo"):
        try:
            torch.onnx.export(
                encoder, (example,), str(path), dynamo=True, external_data=True, verbose=False,
                dynamic_shapes={"images": {0: torch.export.Dim("N", min=1, max=MAX_BATCH_DIM)}}, **kw,
            )
            return "dynamo"
        except Exception as e:  # torch.export raises many error types
            if exporter == "dynamo":
                raise
            log.warning("dynamo ONNX export failed (%s: %s); using the legacy exporter", type(e).__name__, e)
    torch.onnx.export(
        encoder, (example,), str(path), dynamo=False,
        dynamic_axes={INPUT: {0: "N"}, OUTPUT: {0: "N"}}, **kw,
    )
    return "legacy"


def _clean(model) -> None:
    """Drop exporter metadata that embeds local source paths (keeps bytes reproducible)."""
    del model.metadata_props[:]
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    model.doc_string = ""
    model.producer_name = "hashret"
    from hashret import __version__

    model.producer_version = __version__


def ort_run(model_or_path, images: np.ndarray) -> np.ndarray:
    """Run an ONNX model (path or bytes) on CPU with ONNX Runtime."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    src = model_or_path if isinstance(model_or_path, (bytes, str)) else str(model_or_path)
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: images})[0]


def try_slim(model, images: np.ndarray, reference: np.ndarray) -> tuple[object, np.ndarray, dict]:
    """onnxslim the model; keep the result only if outputs stay within 1e-5 with identical signs.

    Returns (model kept, its outputs on `images`, facts)."""
    try:
        import onnxslim
    except ImportError:
        return model, reference, {"slim": "skipped: onnxslim not installed"}
    try:
        slim = onnxslim.slim(model)
        out = ort_run(slim.SerializeToString(), images)
    except Exception as e:  # onnxslim may fail on unusual graphs; the unslimmed model is fine
        return model, reference, {"slim": f"rejected: {type(e).__name__}: {e}"}
    diff = float(np.abs(out - reference).max())
    same_signs = bool(((out >= 0) == (reference >= 0)).all())
    info = {"slim_max_diff": diff, "nodes_before": len(model.graph.node), "nodes_after": len(slim.graph.node)}
    if diff <= SLIM_ATOL and same_signs:
        return slim, out, {"slim": "kept", **info}
    return model, reference, {"slim": "rejected: outputs changed", **info}


def onnx_from_run(run_dir: str | os.PathLike, out_path: str | os.PathLike, opset: int = DEFAULT_OPSET, *,
                  exporter: str = "auto", slim: bool = True, encoder=None) -> dict:
    """Export RUN's encoder to `out_path` (atomic); returns facts for the manifest.

    Verifies on a seeded noise batch that ONNX Runtime reproduces torch (signs identical), so a
    broken export fails here, not in production.
    """
    try:
        import onnx
        import torch
    except ImportError as e:
        raise Unavailable(f"format onnx | {e.name} is not installed: pip install onnx onnxruntime") from None
    from hashret.models import load_encoder

    if encoder is None:
        encoder, _ = load_encoder(run_dir)
    encoder = encoder.eval()
    size = int(encoder.spec.crop)
    images = test_batch(size)
    with torch.inference_mode():
        reference = encoder(torch.from_numpy(images)).numpy()
    with tempfile.TemporaryDirectory(prefix="hashret-onnx-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        used = _export(encoder, torch.from_numpy(images[:2]), raw, opset, exporter)
        model = onnx.load(str(raw))  # pulls external data in
    _clean(model)
    onnx.checker.check_model(model, full_check=True)
    info: dict = {"exporter": used, "opset": max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))}
    data = model.SerializeToString()
    out = ort_run(data, images)
    if slim:
        model, out, slim_info = try_slim(model, images, out)
        info.update(slim_info)
        if slim_info["slim"] == "kept":
            onnx.checker.check_model(model, full_check=True)
            data = model.SerializeToString()
    diff = float(np.abs(out - reference).max())
    agree = float(((out >= 0) == (reference >= 0)).mean())
    info.update({"check_max_diff": diff, "check_bit_agreement": agree, "nodes": len(model.graph.node)})
    real_flips = int((((out >= 0) != (reference >= 0)) & (np.abs(reference) > 1e-4)).sum())
    if real_flips or diff > 1e-3:
        raise CheckFailed(
            f"{out_path} | ONNX Runtime output differs from torch (max diff {diff:.2e}, bit agreement "
            f"{agree:.4f}) on a test batch: report this with the RUN's manifest"
        )
    atomic_write(out_path, lambda f: f.write(data))
    return info


def add_args(p) -> None:
    o = arg_group(p, "ONNX")
    o.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default: {DEFAULT_OPSET})")
    o.add_argument("--exporter", default="auto", choices=("auto", "dynamo", "legacy"),
                   help="torch.onnx exporter: auto tries dynamo then legacy (default: auto)")
    o.add_argument("--no-slim", action="store_true", help="skip onnxslim (default: slim when outputs stay identical)")


def build(job: ExportJob, out: Path) -> dict:
    """The `onnx` row's build step (export/formats.py)."""
    a = job.args
    job.say(f"      {job.run_manifest['backbone']['name']} ({job.bits} bits) to {out}")
    return onnx_from_run(job.run_dir, out, a.opset, exporter=a.exporter, slim=not a.no_slim, encoder=job.encoder)
