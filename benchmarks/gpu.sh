#!/usr/bin/env bash
# GPU benchmarks in one short run, for a CUDA machine:
#
#   benchmarks/gpu.sh EXP [RESULTS_DIR]
#
# EXP is an export folder from `hashret export` (its golden set inside, for `hashret check`).
# Runs, each step bounded by STEP_TIMEOUT seconds and allowed to fail without stopping the rest:
#   1. engines on CUDA, batch 1..256 (`hashret bench engine EXP --device cuda`):
#      torch eager fp32, torch fp16 + CUDA graphs, ONNX Runtime CUDA EP and TensorRT EP
#      (fp32 and fp16 models), native TensorRT (EXP/model.plan) where installed;
#   2. GPU brute-force Hamming search over 10M packed codes (benchmarks/gpu_search.py: CuPy
#      __popcll where CuPy is installed, torch otherwise) and FAISS flat on the CPU for contrast;
#   3. `hashret check EXP --backend B --device D` per CUDA backend: mAP parity on CUDA against
#      the CPU reference golden set.
# Prints one table and writes JSON to RESULTS_DIR (default benchmarks/results): gpu-*.json, one
# per step, and gpu.json (the summary, including every check's exit code and output tail).
# Installs nothing from the network: missing packages are skipped, except that wheels found in
# $WHEELS (a local folder) are installed with pip --no-index.
#
# Knobs (environment): PYTHON, BATCHES (1,2,4,8,16,32,64,128,256), TRT_BATCHES (1,8,32,128:
# each new shape costs the TensorRT EP an engine build), ITERS (30), WARMUP (5), MAX_SECONDS (8),
# SEARCH_SIZES (10000000), SEARCH_QUERIES (100), STEP_TIMEOUT (300), SKIP (space-separated step
# names to skip: engine search check cpu), ALLOW_NO_GPU=1 (run anyway without a GPU: every CUDA
# step then records its failure; for testing this script).
set -uo pipefail

usage() { sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; }
if [ $# -lt 1 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then usage; exit 2; fi

ORIG=$PWD
GPU_SH_CMD=$(printf '%q ' "$0" "$@")
EXP=$1
OUT=${2:-}
PY=${PYTHON:-python3}
BATCHES=${BATCHES:-1,2,4,8,16,32,64,128,256}
TRT_BATCHES=${TRT_BATCHES:-1,8,32,128}
ITERS=${ITERS:-30}
WARMUP=${WARMUP:-5}
MAX_SECONDS=${MAX_SECONDS:-8}
SEARCH_SIZES=${SEARCH_SIZES:-10000000}
SEARCH_QUERIES=${SEARCH_QUERIES:-100}
STEP_TIMEOUT=${STEP_TIMEOUT:-300}
SKIP=" ${SKIP:-} "

if [ ! -f "$EXP/manifest.json" ]; then echo "error: $EXP/manifest.json not found: pass an export folder" >&2; exit 2; fi
EXP=$(cd "$EXP" && pwd)
cd "$(dirname "$0")/.." || exit 2  # the repository root: python -m hashret / benchmarks work from here
case "$OUT" in "") OUT=$PWD/benchmarks/results;; /*) ;; *) OUT=$ORIG/$OUT;; esac
mkdir -p "$OUT"
LOGDIR=$(mktemp -d "${TMPDIR:-/tmp}/hashret-gpu.XXXXXX")
STEPS="$LOGDIR/steps.tsv"  # name \t rc \t seconds \t json \t log \t command
: >"$STEPS"
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1

echo "== hashret gpu.sh: EXP=$EXP OUT=$OUT logs=$LOGDIR"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
else
  echo "warning: nvidia-smi not found"
fi

# Optional offline wheels (never the network).
if [ -n "${WHEELS:-}" ] && [ -d "$WHEELS" ]; then
  for spec in onnxruntime-gpu:onnxruntime tensorrt:tensorrt cupy-cuda12x:cupy; do
    pkg=${spec%%:*}; mod=${spec##*:}
    if ! "$PY" -c "import $mod" >/dev/null 2>&1 && ls "$WHEELS"/"${pkg//-/_}"-*.whl >/dev/null 2>&1; then
      echo "installing $pkg from $WHEELS (offline)"
      "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" "$pkg" || echo "warning: $pkg install failed"
    fi
  done
fi

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  if [ "${ALLOW_NO_GPU:-0}" = 1 ]; then
    echo "warning: torch sees no CUDA GPU; continuing (ALLOW_NO_GPU=1): CUDA steps will be skipped or fail"
  else
    echo "error: torch sees no CUDA GPU; this script is for CUDA machines (ALLOW_NO_GPU=1 to run anyway)" >&2
    exit 2
  fi
fi
has() { "$PY" -c "import $1" >/dev/null 2>&1; }
ort_has() { "$PY" -c "import onnxruntime as o, sys; sys.exit(0 if '$1' in o.get_available_providers() else 1)" >/dev/null 2>&1; }

# step NAME JSON_OR_- COMMAND...: run bounded, log to a file, record rc and seconds.
step() {
  local name=$1 json=$2; shift 2
  case "$SKIP" in *" ${name%%-*} "*) echo "-- skip $name (SKIP)"; return 0;; esac
  local log="$LOGDIR/$name.log" t0 rc
  echo "-- $name: $*"
  t0=$(date +%s)
  if [ -n "${STEP_STDOUT:-}" ]; then  # stdout kept apart (e.g. `hashret check --json`), stderr to the log
    timeout --signal=TERM --kill-after=20 "$STEP_TIMEOUT" "$@" >"$STEP_STDOUT" 2>"$log"
  else
    timeout --signal=TERM --kill-after=20 "$STEP_TIMEOUT" "$@" >"$log" 2>&1
  fi
  rc=$?
  tail -n 4 "$log" | sed 's/^/   | /'
  [ "$rc" = 124 ] && echo "   timed out after ${STEP_TIMEOUT}s"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$json" "$log" "$*" >>"$STEPS"
}

HB=("$PY" -m hashret)
ENG=(bench engine "$EXP" --iters "$ITERS" --warmup "$WARMUP" --max-seconds "$MAX_SECONDS")

# 1. engines on CUDA
step engine-torch-fp32 "$OUT/gpu-engine-torch-fp32.json" "${HB[@]}" "${ENG[@]}" --device cuda --backends torch \
  --batches "$BATCHES" --option precision=fp32 --option graph_batches= --label torch-fp32-eager \
  --out "$OUT/gpu-engine-torch-fp32.json"
step engine-torch-fp16 "$OUT/gpu-engine-torch-fp16-graphs.json" "${HB[@]}" "${ENG[@]}" --device cuda --backends torch \
  --batches "$BATCHES" --option precision=fp16 --option "graph_batches=$BATCHES" --label torch-fp16-graphs \
  --out "$OUT/gpu-engine-torch-fp16-graphs.json"
if ort_has CUDAExecutionProvider; then
  step engine-ort-cuda "$OUT/gpu-engine-ort-cuda.json" "${HB[@]}" "${ENG[@]}" --device cuda --backends ort,ort-fp16 \
    --batches "$BATCHES" --label "{backend}@cuda-ep" --out "$OUT/gpu-engine-ort-cuda.json"
else
  echo "-- skip engine-ort-cuda: onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)"
fi
if ort_has TensorrtExecutionProvider; then
  step engine-ort-trt "$OUT/gpu-engine-ort-trt.json" "${HB[@]}" "${ENG[@]}" --device tensorrt --backends ort,ort-fp16 \
    --batches "$TRT_BATCHES" --label "{backend}@trt-ep" --out "$OUT/gpu-engine-ort-trt.json"
else
  echo "-- skip engine-ort-trt: onnxruntime has no TensorrtExecutionProvider"
fi
if has tensorrt && [ -f "$EXP/model.plan" ]; then
  step engine-tensorrt "$OUT/gpu-engine-tensorrt.json" "${HB[@]}" "${ENG[@]}" --device cuda --backends tensorrt \
    --batches "$BATCHES" --out "$OUT/gpu-engine-tensorrt.json"
else
  echo "-- skip engine-tensorrt: needs the tensorrt package and $EXP/model.plan (hashret export ... --formats tensorrt)"
fi
# The same machine's CPU, for contrast (few batches: it is slow).
step cpu-engine "$OUT/gpu-machine-cpu-engine.json" "${HB[@]}" "${ENG[@]}" --device cpu --backends torch,ort,openvino \
  --batches 1,8,32 --iters 10 --out "$OUT/gpu-machine-cpu-engine.json"

# 2. search
step search-gpu "$OUT/gpu-search.json" "$PY" -m benchmarks.gpu_search --device cuda --sizes "$SEARCH_SIZES" \
  --queries "$SEARCH_QUERIES" --out "$OUT/gpu-search.json"
step cpu-search "$OUT/gpu-machine-cpu-search.json" "${HB[@]}" bench search --sizes "$SEARCH_SIZES" \
  --kinds faiss-flat --queries 20 --k 10,100 --threads 1 --out "$OUT/gpu-machine-cpu-search.json"

# 3. parity checks on CUDA against the CPU golden set
check() {  # check NAME BACKEND DEVICE: its --json result lands in $LOGDIR/check-NAME.json
  STEP_STDOUT="$LOGDIR/check-$1.json" step "check-$1" - "${HB[@]}" check "$EXP" --backend "$2" --device "$3" --json
}
check torch-cuda torch cuda
if ort_has CUDAExecutionProvider; then check ort-cuda ort cuda; check ort-fp16-cuda ort-fp16 cuda; fi
if ort_has TensorrtExecutionProvider; then check ort-trt ort tensorrt; fi
if has tensorrt && [ -f "$EXP/model.plan" ]; then check tensorrt tensorrt cuda; fi

# Summary: one table, and gpu.json with the steps (commands, exit codes, check output tails).
GPU_SH_CMD=$GPU_SH_CMD BATCHES=$BATCHES TRT_BATCHES=$TRT_BATCHES ITERS=$ITERS WARMUP=$WARMUP \
  MAX_SECONDS=$MAX_SECONDS SEARCH_SIZES=$SEARCH_SIZES SEARCH_QUERIES=$SEARCH_QUERIES STEP_TIMEOUT=$STEP_TIMEOUT \
  "$PY" - "$STEPS" "$OUT" "$EXP" <<'PYEOF'
import json, os, shlex, sys
from pathlib import Path

from benchmarks import machine

steps_file, out, exp = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
steps, rows = [], []
for line in Path(steps_file).read_text().splitlines():
    name, rc, secs, js, log, cmd = line.split("\t", 5)
    tail = Path(log).read_text(errors="replace").splitlines()[-15:] if Path(log).is_file() else []
    entry = {"step": name, "rc": int(rc), "seconds": int(secs), "json": None if js == "-" else js,
             "command": cmd, "output_tail": tail}
    check_json = Path(log).with_suffix(".json")
    if name.startswith("check-") and check_json.is_file():
        try:
            c = json.loads(check_json.read_text())
            entry["check"] = {k: c.get(k) for k in ("backend", "device", "bit_flip", "map_drop", "passed",
                                                    "failures", "verdict", "thresholds")}
        except ValueError:
            entry["check"] = None
    steps.append(entry)
    if js != "-" and Path(js).is_file():
        doc = json.loads(Path(js).read_text())
        for r in doc.get("results", []):
            if doc.get("benchmark") == "engine":
                rows.append([r.get("label") or r["backend"], r["device"], f"batch {r['batch']}",
                             f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}", f"{r['img_per_s']:.0f} img/s"])
            elif doc.get("benchmark") in ("gpu-search", "search"):
                pq = r["per_query"]
                rows.append([r.get("method") or r.get("label"), r.get("device", "cpu"),
                             f"n={r['size']:,} k={r['k']}", f"{pq['p50_ms']:.3f}", f"{pq['p99_ms']:.3f}",
                             f"recall {r.get('recall', '-')}"])
        for s in doc.get("skipped", []):
            rows.append([s.get("backend") or s.get("method") or s.get("kind"), s.get("device", "-"), "skipped",
                         "-", "-", str(s.get("reason", ""))[:60]])
    if name.startswith("check-"):
        c = entry.get("check") or {}
        detail = (f" bit flips {c['bit_flip']:.4f}, mAP drop {c['map_drop']:+.4f}"
                  if isinstance(c.get("bit_flip"), float) and isinstance(c.get("map_drop"), float) else "")
        verdict = "PASS" if rc == "0" else "FAIL (threshold)" if rc == "1" else f"ERROR rc={rc}"
        rows.append([name, c.get("device") or "-", "check", "-", "-", verdict + detail])
print()
machine.print_table(["what", "device", "case", "p50 ms", "p99 ms", "result"], rows)
knobs = ("BATCHES", "TRT_BATCHES", "ITERS", "WARMUP", "MAX_SECONDS", "SEARCH_SIZES", "SEARCH_QUERIES", "STEP_TIMEOUT")
doc = {**machine.run_meta("gpu", threads={"note": "see each gpu-*.json"},
                          argv=shlex.split(os.environ.get("GPU_SH_CMD", "benchmarks/gpu.sh"))),
       "config": {"exp": exp, **{k.lower(): os.environ.get(k) for k in knobs}},
       "results": [{k: v for k, v in s.items() if k not in ("output_tail", "check")} for s in steps],
       "steps": steps}
machine.write_result(doc, out / "gpu.json")
print(f"\nwrote {out / 'gpu.json'} (+ the gpu-*.json above); regenerate RESULTS.md with: hashret bench report")
PYEOF
