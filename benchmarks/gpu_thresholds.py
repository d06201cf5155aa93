"""`python -m benchmarks.gpu_thresholds BACKEND DEVICE`: the `hashret check` gates gpu.sh uses.

An fp32 engine matches the CPU reference to rounding, so a bit flip beyond 0.1% means a real
defect. An fp16 engine (torch on CUDA, which runs fp16 autocast by default; ort-fp16; TensorRT,
whose engines are fp16) rounds activations to ~3 significant digits, so codes whose tanh output
sits within ~1e-3 of zero flip sign. Measured here on 276 real Grocery photos, effnet-lite0
32-bit, ort-fp16 on the CPU: 0.11% of bits flipped, already over the fp32 gate. The fp16 gate is
ten times that (1%), the same as the INT8 advice in `hashret check --help`; the mAP gate is 0.02
because on a golden set of 24-64 images one flipped bit can move mAP@all by ~0.01.
"""
from __future__ import annotations

import sys

FP32 = {"max_bit_flip": 0.001, "max_map_drop": 0.005}  # `hashret check`'s own defaults
FP16 = {"max_bit_flip": 0.01, "max_map_drop": 0.02}
FP16_BACKENDS = ("ort-fp16", "tensorrt")


def precision_of(backend: str, device: str, torch_precision: str | None = None) -> str:
    """fp16 or fp32: what the backend computes in on `device` with default options."""
    on_gpu = device.split(":")[0] in ("cuda", "tensorrt")
    if backend == "torch":
        return (torch_precision or "fp16") if on_gpu else "fp32"
    # ort on the TensorRT EP stays fp32: hashret does not set the EP's trt_fp16_enable
    return "fp16" if backend in FP16_BACKENDS else "fp32"


def thresholds(backend: str, device: str, torch_precision: str | None = None) -> dict:
    return dict(FP16 if precision_of(backend, device, torch_precision) == "fp16" else FP32)


def check_flags(backend: str, device: str, torch_precision: str | None = None) -> list[str]:
    t = thresholds(backend, device, torch_precision)
    return ["--max-bit-flip", str(t["max_bit_flip"]), "--max-map-drop", str(t["max_map_drop"])]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (2, 3):
        print("usage: python -m benchmarks.gpu_thresholds BACKEND DEVICE [TORCH_PRECISION]", file=sys.stderr)
        return 2
    print(" ".join(check_flags(*argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
