"""A tiny but real export folder: the test suite's and the storage benchmarks' stand-in model.

It has the interface of a real model (uint8 [N, crop, crop, 3] in, tanh [N, bits] out, the real
preprocessing) with a few thousand weights, so it exports in seconds and costs little CPU when a
benchmark measures the gallery and the server rather than the network. It lives here, not in
tests/, because `hashret bench snapshot` needs it from an installed package too.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from hashret.images import PreprocessSpec

BITS = 64
SPEC = PreprocessSpec()  # 256 -> 224, like the real backbones: realistic decode/resize cost


def build_tiny_exp(exp: Path, bits: int = BITS, spec: PreprocessSpec = SPEC, seed: int = 0) -> Path:
    """A real export folder (model.onnx via the project's exporter + manifest) of a tiny CNN.

    Same interface as a real model (uint8 [N, crop, crop, 3] -> tanh [N, bits]) and the real
    preprocessing, but a few thousand weights: fast to export and to run on 2 shared cores.
    """
    import torch
    from torch import nn

    from export.onnx_format import onnx_from_run
    from hashret.manifest import SCHEMA_VERSION, file_entry, now_iso, versions, write_manifest
    from hashret.models import Backbone, HashEncoder, HashHead, _Pooled

    exp.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Conv2d(3, 16, 5, stride=4), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2), nn.ReLU())
    bb = Backbone("tiny-cnn", _Pooled(trunk), 16, spec, "none", trunk)
    enc = HashEncoder(bb, HashHead(16, bits, hidden=0)).eval()
    with warnings.catch_warnings():  # torch's notice about the legacy exporter
        warnings.simplefilter("ignore", DeprecationWarning)
        onnx_from_run(None, exp / "model.onnx", exporter="legacy", slim=False, encoder=enc)
    write_manifest(exp, {
        "schema_version": SCHEMA_VERSION, "kind": "export", "created": now_iso(), "bits": bits,
        "preprocessing": spec.to_dict(),
        "backbone": {"name": "tiny-cnn", "weights": "none", "feature_dim": 16},
        "method": {"name": "hashnet"}, "dataset": {"format": "synthetic"},
        "export": {"files": {"model.onnx": file_entry(exp / "model.onnx")}},
        "versions": versions(),
    })
    return exp
