"""The TensorRT backend ("tensorrt"): EXP/model.plan with engine.json beside it.

A serialized engine only runs on the TensorRT version and GPU architecture that built it; a
mismatch otherwise surfaces as an opaque deserialization failure or, worse, a crash. So the
build facts in engine.json are checked against this runtime *before* deserializing, and a
mismatch is refused with the command that rebuilds the engine. Uses the tensor-name API of
TensorRT 10/11 (set_input_shape, set_tensor_address, execute_async_v3) with torch CUDA tensors
as buffers, so no pycuda/cuda-python dependency is needed.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hashret.engines.base import Engine
from hashret.errors import ArtifactMismatch, BadInput, MissingArtifact, Unavailable

ENGINE_INFO = "engine.json"
PIP_HINT = "pip install tensorrt (needs an NVIDIA GPU and driver)"


def import_tensorrt():
    """`import tensorrt`, as Unavailable with the install hint when it fails."""
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or OSError from a missing libnvinfer
        raise Unavailable(f"tensorrt not installed: {PIP_HINT} ({type(e).__name__}: {e})") from None
    return trt


def cuda_device_facts(device: str = "cuda") -> dict:
    """Name and compute capability of the CUDA device, via torch (Unavailable without a GPU)."""
    import torch

    if not torch.cuda.is_available():
        raise Unavailable("tensorrt | no CUDA GPU visible (torch.cuda.is_available() is False)")
    dev = torch.device(device if device.startswith("cuda") else "cuda")
    major, minor = torch.cuda.get_device_capability(dev)
    return {"gpu": torch.cuda.get_device_name(dev), "compute_capability": f"{major}.{minor}"}


def check_engine_info(info: dict, trt_version: str, facts: dict, plan: str | Path) -> None:
    """Refuse an engine built by another TensorRT version or for another GPU architecture."""
    rebuild = f"rebuild with hashret export {Path(plan).parent} --formats tensorrt on this machine"
    built_v = str(info.get("tensorrt_version"))
    if built_v != str(trt_version):
        raise ArtifactMismatch(
            f"{plan} | built with TensorRT {built_v}, this runtime is TensorRT {trt_version}: {rebuild}"
        )
    built_cc = str(info.get("compute_capability"))
    if built_cc != facts["compute_capability"]:
        raise ArtifactMismatch(
            f"{plan} | built for compute capability {built_cc} ({info.get('gpu')}), this GPU is "
            f"{facts['compute_capability']} ({facts['gpu']}): {rebuild}"
        )


def read_engine_info(plan: str | Path) -> dict:
    p = Path(plan).with_name(ENGINE_INFO)
    if not p.is_file():
        raise MissingArtifact(f"{p} | missing beside {Path(plan).name}: rebuild with hashret export --formats tensorrt")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactMismatch(f"{p} | not valid JSON ({e}): rebuild with hashret export --formats tensorrt") from None


class TensorRTEngine(Engine):
    """One execution context on one CUDA stream; batches above the profile's max are split."""

    name = "tensorrt"

    def _load(self) -> None:
        trt = import_tensorrt()
        import torch

        self.torch = torch
        facts = cuda_device_facts(self.device)
        info = read_engine_info(self.model_path)
        check_engine_info(info, trt.__version__, facts, self.model_path)
        self.dev = torch.device(self.device if self.device.startswith("cuda") else "cuda")
        torch.cuda.set_device(self.dev)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(self.model_path).read_bytes())
        if self.engine is None:
            raise ArtifactMismatch(f"{self.model_path} | TensorRT could not deserialize it: rebuild with "
                                   "hashret export EXP --formats tensorrt")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ArtifactMismatch(f"{self.model_path} | has inputs {inputs} and outputs {outputs}, expected one each")
        self.input, self.output = inputs[0], outputs[0]
        dtypes = {trt.DataType.UINT8: torch.uint8, trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}
        in_dt = self.engine.get_tensor_dtype(self.input)
        if dtypes.get(in_dt) is not torch.uint8:
            raise ArtifactMismatch(f"{self.model_path} | input dtype {in_dt}, expected UINT8: rebuild the engine")
        self.out_dtype = dtypes.get(self.engine.get_tensor_dtype(self.output), torch.float32)
        lo, _opt, hi = self.engine.get_tensor_profile_shape(self.input, 0)
        self.min_batch, self.max_batch = int(lo[0]), int(hi[0])
        self.stream = torch.cuda.Stream(self.dev)

    def _run(self, chunk: np.ndarray) -> np.ndarray:
        torch = self.torch
        n = chunk.shape[0]
        b = max(n, self.min_batch)
        with torch.cuda.stream(self.stream):
            x = torch.zeros((b, self.size, self.size, 3), dtype=torch.uint8, device=self.dev)
            x[:n].copy_(torch.from_numpy(chunk))
            out = torch.empty((b, self.bits), dtype=self.out_dtype, device=self.dev)
            if not self.context.set_input_shape(self.input, tuple(x.shape)):
                raise BadInput(f"tensorrt engine | batch {b} is outside the engine's profile "
                               f"[{self.min_batch}, {self.max_batch}]")
            self.context.set_tensor_address(self.input, x.data_ptr())
            self.context.set_tensor_address(self.output, out.data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("tensorrt engine | execute_async_v3 failed (see the TensorRT log above)")
            res = out[:n].float().cpu()  # on self.stream: ordered after the execution
        self.stream.synchronize()
        return res.numpy()

    def _encode(self, images: np.ndarray) -> np.ndarray:
        parts = [self._run(images[i:i + self.max_batch]) for i in range(0, images.shape[0], self.max_batch)]
        return np.concatenate(parts)

    def _close(self) -> None:
        self.context = None
        self.engine = None
        self.runtime = None
