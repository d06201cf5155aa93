"""The PyTorch backend ("torch"): EXP/model.pt in the encoder built from EXP/manifest.json.

It is the parity reference (CPU fp32, the exact training graph). On CUDA it runs under fp16
autocast and replays CUDA graphs captured per fixed batch size: a batch is padded up to the next
captured size, so kernel-launch overhead, which dominates small batches, is paid once.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from hashret.engines.base import Engine, torch_oom_errors
from hashret.errors import BadInput, MissingArtifact, Unavailable, first_line

log = logging.getLogger("hashret.engines.torch")

DEFAULT_GRAPH_BATCHES = (1, 8, 32)


class TorchEngine(Engine):
    """Options: `precision` ("fp32" | "fp16"; default fp32 on CPU, fp16 on CUDA),
    `graph_batches` (CUDA graph batch sizes, default 1, 8, 32; empty disables graphs),
    `threads` (CPU intra-op threads; default: torch's)."""

    name = "torch"

    def _load(self) -> None:
        import torch

        from hashret.manifest import load_manifest
        from hashret.models import encoder_from_config

        self.torch = torch
        path = Path(self.model_path)
        if not path.is_file():
            raise MissingArtifact(f"{path} | not found: re-export with hashret export")
        m = load_manifest(path.parent, kind=("run", "export"))
        enc = encoder_from_config(m)
        try:
            enc.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as e:
            raise BadInput(f"{path} | cannot load weights ({type(e).__name__}: {e}): re-export") from None
        enc.eval()
        dev = self.device
        if dev.startswith("cuda"):
            if not torch.cuda.is_available():
                raise Unavailable("backend torch | --device cuda but no CUDA GPU is visible: use --device cpu")
            self.dev = torch.device(dev)
            if self.dev.index is not None:
                # graph capture and torch.cuda.Stream() without a device use the current device,
                # which stays cuda:0 unless set: a cuda:1 graph would then capture on the wrong GPU
                torch.cuda.set_device(self.dev)
            self.precision = self.options.get("precision", "fp16")
        elif dev == "cpu":
            self.dev = torch.device("cpu")
            self.precision = self.options.get("precision", "fp32")
            if self.options.get("threads"):
                torch.set_num_threads(int(self.options["threads"]))
        else:
            raise BadInput(f"device {dev!r} | unknown for torch: choose cpu or cuda[:N]")
        if self.precision not in ("fp32", "fp16"):
            raise BadInput(f"option precision | {self.precision!r}: choose fp32 or fp16")
        if self.precision == "fp16" and self.dev.type != "cuda":
            raise BadInput("option precision | fp16 needs --device cuda (CPU runs fp32)")
        self.model = enc.to(self.dev)
        self.graph_batches = tuple(sorted(int(b) for b in self.options.get("graph_batches", DEFAULT_GRAPH_BATCHES)))
        self._graphs: dict[int, tuple] = {}  # batch -> (graph, static input, static output)

    def _forward(self, x):
        torch = self.torch
        with torch.inference_mode():
            if self.precision == "fp16":
                # no autocast weight-cast cache: CUDA graph capture must record the casts
                with torch.autocast("cuda", dtype=torch.float16, cache_enabled=False):
                    return self.model(x).float()
            return self.model(x)

    def _graph_for(self, b: int):
        """Capture (once) a CUDA graph of the forward pass for batch size b."""
        torch = self.torch
        if b not in self._graphs:
            # another engine in this process may have moved the current device since load()
            with torch.cuda.device(self.dev):
                static_in = torch.zeros((b, self.size, self.size, 3), dtype=torch.uint8, device=self.dev)
                side = torch.cuda.Stream(self.dev)
                side.wait_stream(torch.cuda.current_stream(self.dev))
                with torch.cuda.stream(side):
                    for _ in range(3):  # warm up cuDNN autotuning outside the capture
                        self._forward(static_in)
                torch.cuda.current_stream(self.dev).wait_stream(side)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    static_out = self._forward(static_in)
            self._graphs[b] = (g, static_in, static_out)
        return self._graphs[b]

    def _encode(self, images: np.ndarray) -> np.ndarray:
        torch = self.torch
        x = torch.from_numpy(images)
        if self.dev.type != "cuda":
            return self._forward(x).numpy()
        if not self.graph_batches:
            return self._forward(x.to(self.dev, non_blocking=True)).cpu().numpy()
        return self._encode_with_graphs(x)

    def _encode_with_graphs(self, x) -> np.ndarray:
        """x in chunks of the captured batch sizes, each padded up to the next size and replayed.

        A size whose capture runs out of device memory is dropped for good, with the sizes above
        it, and the chunk is planned again with what is left: otherwise every batch that needs it
        would pay for a failed capture again. With no size left, the error is raised (the server's
        batcher then encodes the batch in halves).
        """
        outs, i, n = [], 0, x.shape[0]
        while i < n:
            chunk = x[i:i + self.graph_batches[-1]]
            m = chunk.shape[0]
            b = next(s for s in self.graph_batches if s >= m)
            failed = None
            try:
                g, static_in, static_out = self._graph_for(b)
            except torch_oom_errors() as e:
                if b == self.graph_batches[0]:
                    raise
                failed = first_line(e)
            if failed is not None:  # out of the except block: the failed capture's memory is free
                self._graphs.pop(b, None)
                self.graph_batches = tuple(s for s in self.graph_batches if s < b)
                if self.dev.type == "cuda":
                    self.torch.cuda.empty_cache()
                log.warning("torch engine | out of device memory capturing the CUDA graph for batch %d (%s): "
                            "batch sizes from now on: %s", b, failed, ", ".join(map(str, self.graph_batches)))
                continue
            static_in[:m].copy_(chunk, non_blocking=True)
            if m < b:
                static_in[m:].zero_()
            g.replay()
            outs.append(static_out[:m].to("cpu", copy=True).numpy())  # the next replay rewrites static_out
            i += m
        return np.concatenate(outs)

    def describe(self) -> dict:
        d = super().describe()
        if getattr(self, "torch", None) is not None:
            # torch's pools are process-wide: what is in force, whatever this engine asked for
            d["torch_num_threads"] = self.torch.get_num_threads()
            d["torch_interop_threads"] = self.torch.get_num_interop_threads()
        return d

    def _close(self) -> None:
        self._graphs.clear()
        self.model = None
        if self.dev.type == "cuda":
            self.torch.cuda.empty_cache()
