#!/usr/bin/env bash
# TensorRT end to end on a machine with an NVIDIA GPU and `pip install tensorrt`:
#
#   benchmarks/tensorrt_check.sh RUN_OR_EXP [OUT]
#
# 1. exports RUN_OR_EXP (a training RUN, or an EXP: it holds model.pt) to OUT (default:
#    <RUN_OR_EXP>-trt) with --formats onnx,onnx-fp16,tensorrt,triton (fp16 engine, batch 1..64);
# 2. `hashret check OUT --backend tensorrt --device cuda` against the golden set with the fp16
#    gates of benchmarks/gpu_thresholds.py (fp16 flips bits whose activation sits near zero),
#    and the ort CPU check for contrast;
# 3. times the engine: trtexec when on PATH, else `hashret bench engine`, else a python loop.
# Knobs (environment): PYTHON (python3), MAX_BIT_FLIP (0.01), MAX_MAP_DROP (0.02),
# BATCHES (1,8,32,64), EXPORT_ARGS (extra `hashret export` flags, e.g. "--timing-cache /tmp/tc").
# Exit status: the TensorRT check's (0 pass, 1 threshold exceeded, 2 artifact problem).
set -uo pipefail

if [ $# -lt 1 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 2; fi
abspath() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
SRC=$(abspath "${1%/}")
OUT=$(abspath "${2:-${1%/}-trt}")
PY=${PYTHON:-python3}
MAX_BIT_FLIP=${MAX_BIT_FLIP:-0.01}
MAX_MAP_DROP=${MAX_MAP_DROP:-0.02}
BATCHES=${BATCHES:-1,8,32,64}
cd "$(dirname "$0")/.." || exit 2

"$PY" -c 'import tensorrt, torch; assert torch.cuda.is_available(), "no CUDA GPU"; print("TensorRT", tensorrt.__version__, "on", torch.cuda.get_device_name())' 2>/dev/null \
  || { echo "tensorrt_check: needs an NVIDIA GPU and the tensorrt package (pip install tensorrt)" >&2; exit 2; }

echo "== export $SRC -> $OUT"
# shellcheck disable=SC2086
"$PY" -m hashret export "$SRC" --out "$OUT" --formats onnx,onnx-fp16,tensorrt,triton \
  --min-batch 1 --opt-batch 8 --max-batch 64 ${EXPORT_ARGS:-} || exit $?

echo "== check (TensorRT, CUDA)"
"$PY" -m hashret check "$OUT" --backend tensorrt --device cuda --max-bit-flip "$MAX_BIT_FLIP" --max-map-drop "$MAX_MAP_DROP"
rc=$?
echo "== check (ONNX Runtime, CPU) for contrast"
"$PY" -m hashret check "$OUT" --backend ort || true

echo "== timing"
if command -v trtexec >/dev/null 2>&1; then
  for b in ${BATCHES//,/ }; do
    echo "-- trtexec batch $b"
    trtexec --loadEngine="$OUT/model.plan" --shapes=images:${b}x224x224x3 --useCudaGraph --noDataTransfers \
      --warmUp=500 --duration=5 2>&1 | grep -E "Throughput|Latency: min" || true
  done
elif "$PY" -c 'import benchmarks.engine' 2>/dev/null; then
  "$PY" -m hashret bench engine "$OUT" --backends tensorrt,torch --device cuda --batches "$BATCHES" || true
else
  "$PY" - "$OUT" "$BATCHES" <<'PY' || true
import sys, time, numpy as np
from hashret.engines import open_engine
exp, batches = sys.argv[1], [int(b) for b in sys.argv[2].split(",")]
with open_engine(exp, "tensorrt", device="cuda") as eng:
    for b in batches:
        x = np.random.default_rng(0).integers(0, 256, (b, eng.size, eng.size, 3), dtype=np.uint8)
        for _ in range(10): eng.encode(x)
        t = []
        for _ in range(50):
            t0 = time.perf_counter(); eng.encode(x); t.append(time.perf_counter() - t0)
        ms = float(np.median(t)) * 1000
        print(f"tensorrt batch {b:4d}: {ms:8.2f} ms median (host->device->host), {b / ms * 1000:9.0f} img/s")
PY
fi
exit $rc
