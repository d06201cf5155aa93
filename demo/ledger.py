"""Numbered progress lines with elapsed times, and steps.json: what each finished step was made from.

A re-run reuses a step whose recorded inputs equal today's and whose outputs exist; anything else
is redone from an empty output folder, so a half-written folder is never taken for a finished one.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from demo.data import clear

STATE = "steps.json"


class Ledger:
    def __init__(self, workdir: Path, total: int, fresh: bool):
        self.workdir, self.total, self.n = workdir, total, 0
        self.path = workdir / STATE
        self.state: dict = {}
        if not fresh and self.path.is_file():
            try:
                self.state = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self.state = {}  # a damaged record only costs a re-run of every step
        self.timings: dict[str, dict] = {}

    def begin(self, name: str, what: str) -> float:
        self.n += 1
        print(f"[{self.n}/{self.total}] {name}: {what}", flush=True)
        return time.perf_counter()

    def end(self, name: str, t: float, reused: bool = False, note: str = "") -> None:
        dt = time.perf_counter() - t
        self.timings[name] = {"seconds": round(dt, 2), "reused": reused}
        tail = f" ({note})" if note else ""
        print(f"      {name} {'reused' if reused else 'done'} in {dt:.1f} s{tail}", flush=True)

    def reusable(self, name: str, params: dict, outputs: list[Path]) -> bool:
        return self.state.get(name, {}).get("params") == params and all(o.exists() for o in outputs)

    def record(self, name: str, params: dict) -> None:
        from hashret.fsutil import write_json_atomic

        self.state[name] = {"params": params, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_json_atomic(self.path, self.state)

    def forget(self, name: str) -> None:
        if self.state.pop(name, None) is not None:
            from hashret.fsutil import write_json_atomic

            write_json_atomic(self.path, self.state)

    def make(self, name: str, what: str, params: dict, folder: Path, outputs: list[Path],
             build: Callable[[], None]) -> None:
        """One step that makes `folder`: reused when recorded with these params and `outputs` exist,
        else forgotten first (an interrupted build must not look finished), emptied and rebuilt."""
        t = self.begin(name, what)
        if self.reusable(name, params, outputs):
            self.end(name, t, reused=True, note=str(folder))
            return
        self.forget(name)
        clear(folder)
        build()
        self.record(name, params)
        self.end(name, t, note=str(folder))
