"""What a format's build step is given: one export in progress.

A build step reads the run (encoder, preprocessing, bits, images) and the parsed flags from the
job, writes into job.exp and returns facts for the manifest. The job records what each step
built and wrote, so the manifest, the Triton repository and the parity table need no list of
formats of their own.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hashret.datasets import Splits
from hashret.images import PreprocessSpec

from export import formats as F


@dataclass
class ExportJob:
    args: argparse.Namespace
    run_dir: Path
    exp: Path
    run_manifest: dict
    encoder: Any  # hashret.models.HashEncoder, in eval mode
    spec: PreprocessSpec
    bits: int
    chosen: list[F.Format]
    skipped: dict[str, str] = field(default_factory=dict)  # format name -> why it is not built
    splits: Splits | None = None  # the run's dataset, when some step needs images
    built: dict[str, dict] = field(default_factory=dict)  # format name -> facts, in build order
    files: list[str] = field(default_factory=list)  # written, relative to EXP (manifest export.files)
    golden: dict | None = None  # facts of golden.npz, when written
    total_steps: int = 0
    _step: int = 0
    _step_t0: float = 0.0

    def path(self, name: str) -> Path:
        return self.exp / name

    def has(self, name: str) -> bool:
        return name in self.built

    def wrote(self, *names: str) -> None:
        """Name files a step wrote besides its row's own file (listed with their sha256)."""
        self.files += [n for n in names if n not in self.files]

    def say(self, msg: str) -> None:
        print(msg, flush=True)

    def stage(self, what: str) -> None:
        """Print the next numbered progress line (and how long the previous step took)."""
        if self._step:
            self.say(f"      done in {time.time() - self._step_t0:.1f} s")
        self._step += 1
        self._step_t0 = time.time()
        self.say(f"[{self._step}/{self.total_steps}] {what}")

    def build(self, row: F.Format) -> dict:
        """Run one row's build step and record its facts and files."""
        facts = row.hook("build")(self, self.path(row.file))
        self.built[row.name] = facts
        if self.path(row.file).is_file():
            self.wrote(row.file)
        return facts

    def require(self, name: str, why: str) -> dict:
        """Build another format now because this step reads its file (TensorRT 11 parses
        model.fp16.onnx) unless it is built already; it is then recorded like a chosen one."""
        if name in self.built:
            return self.built[name]
        row = F.get(name)
        self.say(f"      {row.name}: {row.step or 'building'} ({why})")
        return self.build(row)
