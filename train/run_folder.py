"""Writing the RUN/ folder: manifest.json, model.pt, metrics.json (plots are added by train.plots)."""
from __future__ import annotations

from pathlib import Path

import torch

from hashret.fsutil import atomic_write, write_json_atomic
from hashret.manifest import SCHEMA_VERSION, now_iso, versions, write_manifest
from hashret.models import WEIGHTS_FILE, Backbone, HashEncoder


def run_manifest(
    backbone: Backbone,
    bits: int,
    head: dict,
    method: dict,
    training: dict,
    dataset: dict,
    metrics: dict | None = None,
) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "run",
        "created": now_iso(),
        "backbone": {"name": backbone.name, "weights": backbone.weights, "feature_dim": backbone.dim},
        "head": head,
        "bits": bits,
        "preprocessing": backbone.spec.to_dict(),
        "method": method,
        "training": training,
        "dataset": dataset,
        "weights": WEIGHTS_FILE,
        "metrics": metrics or {},
        "versions": versions("efficientnet-lite-pytorch"),
    }


def write_run(out: str | Path, encoder: HashEncoder, manifest: dict, metrics: dict | None = None) -> Path:
    """Save weights first and the manifest last, so a manifest never points at missing weights."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
    atomic_write(out / WEIGHTS_FILE, lambda f: torch.save(state, f))
    if metrics is not None:
        write_json_atomic(out / "metrics.json", metrics)
        manifest = {**manifest, "metrics": metrics}
    write_manifest(out, manifest)
    return out
