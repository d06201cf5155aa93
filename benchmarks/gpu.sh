#!/usr/bin/env bash
# GPU benchmarks in one short run, for a CUDA machine:
#
#   benchmarks/gpu.sh EXP [RESULTS_DIR]
#
# EXP is an export folder from `hashret export` (golden.npz inside, for `hashret check`; model.pt
# for the torch engine). Each step is bounded by STEP_TIMEOUT seconds and may fail without
# stopping the rest; the script exits 1 when any step failed and lists them.
#   1. engines, batch 1..256 (`hashret bench engine`): torch fp32 eager, torch fp16 + CUDA
#      graphs, ONNX Runtime CUDA/TensorRT EPs and native TensorRT where installed, the CPU beside;
#   2. brute-force Hamming search on the GPU at SEARCH_SIZES codes (benchmarks/gpu_search.py:
#      the torch-flat index kind as served, and the bare CuPy __popcll scan where CuPy is
#      installed), FAISS flat on the CPU if installed;
#   3. `hashret check EXP --backend B --device D` per backend, with fp16 gates for fp16 engines
#      (torch on CUDA, ort-fp16, TensorRT) and fp32 gates otherwise (benchmarks/gpu_thresholds.py);
#   4. the served path: a gallery of IMAGES, then `hashret bench serve` at SERVE_CONCURRENCY with
#      CPU decode, and with nvJPEG decode when `hashret serve` has --decode; then both again with
#      SERVE_WORKERS server processes (`hashret serve --workers`), since one process's event loop
#      caps it near 1,000 Search/s whatever the GPU does.
# Writes gpu-*.json (one per step) and gpu.json (the summary: every step's command, exit code,
# output tail and check result) to RESULTS_DIR (default: $OUT when set, else benchmarks/results),
# and a log of the whole run (gpu.log). Installs nothing: steps whose package is missing are
# skipped with the reason (a stock CUDA host: see benchmarks/device_run.sh and ../shared/GPU.md).
#
# Knobs (environment): PYTHON (python3), BATCHES (1,2,4,8,16,32,64,128,256), TRT_BATCHES
# (1,8,32,128: each new shape costs the TensorRT EP an engine build), ITERS (30), WARMUP (5),
# MAX_SECONDS (4), SEARCH_SIZES (10000000,100000000), SEARCH_QUERIES (100), SEARCH_METHODS
# (torch-flat,cupy-popc; also torch-lut,torch-swar), IMAGES (JPEG folder of class sub-folders for the served path;
# default: EXP/../images when there), GALLERY_KIND (default: a GPU kind when one is registered,
# else faiss-flat when faiss is installed), SERVE_CONCURRENCY (1,16,64), SERVE_SECONDS (8), SERVE_ECHO
# (1: also the bare gRPC echo floors of `bench serve`, two more runs per level), SERVE_WORKERS (4;
# 1: no multi-process steps), SERVE_CLIENTS (4: load-generator processes of `bench serve`, since
# one Python client tops out at a few thousand requests/s), STEP_TIMEOUT (300), DEADLINE_S (none: seconds for the whole run; a
# step gets at most what is left minus 30 s for the summary, and is skipped with under 45 s left),
# SKIP (step groups to skip: engine cpu search check serve), ALLOW_NO_GPU=1
# (no GPU here: run every step on the CPU with small sizes, to prove paths, imports and arguments).
set -uo pipefail

usage() { awk 'NR == 1 { next } !/^#/ { exit } { sub(/^# ?/, ""); print }' "$0"; }  # the header above
if [ $# -lt 1 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then usage; exit 2; fi

ORIG=$PWD
GPU_SH_CMD=$(printf '%q ' "$0" "$@")
EXP=$1
RES=${2:-${OUT:-}}
PY=${PYTHON:-python3}
if [ ! -f "$EXP/manifest.json" ]; then echo "error: $EXP/manifest.json not found: pass an export folder" >&2; exit 2; fi
EXP=$(cd "$EXP" && pwd)
cd "$(dirname "$0")/.." || exit 2  # the repository root: python -m hashret / benchmarks work from here
case "$RES" in "") RES=$PWD/benchmarks/results;; /*) ;; *) RES=$ORIG/$RES;; esac
mkdir -p "$RES" || exit 2
exec > >(tee -a "$RES/gpu.log") 2>&1
LOGDIR=$(mktemp -d "${TMPDIR:-/tmp}/hashret-gpu.XXXXXX")
STEPS="$LOGDIR/steps.tsv"  # name \t rc \t seconds \t json \t log \t command
SKIPS="$LOGDIR/skips.tsv"  # name \t reason
: >"$STEPS"; : >"$SKIPS"
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

echo "== hashret gpu.sh: EXP=$EXP RESULTS=$RES logs=$LOGDIR"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
else
  echo "warning: nvidia-smi not found"
fi

DEV=cuda
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  if [ "${ALLOW_NO_GPU:-0}" = 1 ]; then
    # A rehearsal: the same steps, commands and imports on the CPU, at sizes that take seconds.
    echo "warning: torch sees no CUDA GPU; ALLOW_NO_GPU=1: every step runs on the CPU with small sizes"
    DEV=cpu
    : "${BATCHES:=1,4}" "${ITERS:=3}" "${WARMUP:=1}" "${MAX_SECONDS:=1}" "${SEARCH_SIZES:=20000,100000}"
    : "${SEARCH_QUERIES:=8}" "${SERVE_CONCURRENCY:=1,4}" "${SERVE_SECONDS:=2}" "${STEP_TIMEOUT:=240}"
    : "${SERVE_WORKERS:=2}" "${SERVE_CLIENTS:=2}"
  else
    echo "error: torch sees no CUDA GPU; this script is for CUDA machines (ALLOW_NO_GPU=1 to rehearse on the CPU)" >&2
    exit 2
  fi
fi
BATCHES=${BATCHES:-1,2,4,8,16,32,64,128,256}
TRT_BATCHES=${TRT_BATCHES:-1,8,32,128}
ITERS=${ITERS:-30}
WARMUP=${WARMUP:-5}
MAX_SECONDS=${MAX_SECONDS:-4}
SEARCH_SIZES=${SEARCH_SIZES:-10000000,100000000}
SEARCH_QUERIES=${SEARCH_QUERIES:-100}
# the served kind and the raw kernel; torch-lut/torch-swar on request (torch-flat counts like
# torch-swar where CuPy is missing), to leave the run's minutes to the served path
SEARCH_METHODS=${SEARCH_METHODS:-torch-flat,cupy-popc}
SERVE_CONCURRENCY=${SERVE_CONCURRENCY:-1,16,64}
SERVE_SECONDS=${SERVE_SECONDS:-8}
STEP_TIMEOUT=${STEP_TIMEOUT:-300}
SERVE_WORKERS=${SERVE_WORKERS:-4}
SERVE_CLIENTS=${SERVE_CLIENTS:-4}
START_S=$(date +%s)
DEADLINE_S=${DEADLINE_S:-}
IMAGES=${IMAGES:-$(dirname "$EXP")/images}
SKIP=" ${SKIP:-} "

has() { "$PY" -c "import $1" >/dev/null 2>&1; }
ort_has() { "$PY" -c "import onnxruntime as o, sys; sys.exit(0 if '$1' in o.get_available_providers() else 1)" >/dev/null 2>&1; }
skip() { echo "-- skip $1: $2"; printf '%s\t%s\n' "$1" "$2" >>"$SKIPS"; }

# step NAME JSON_OR_- COMMAND...: run bounded, log to a file, record rc and seconds.
step() {
  local name=$1 json=$2; shift 2
  case "$SKIP" in *" ${name%%-*} "*) skip "$name" "SKIP"; return 0;; esac
  local log="$LOGDIR/$name.log" t0 rc limit=$STEP_TIMEOUT
  if [ -n "$DEADLINE_S" ]; then  # the summary must still be written when the host's clock stops
    local left=$(( DEADLINE_S - ($(date +%s) - START_S) - 30 ))
    if [ "$left" -lt 15 ]; then skip "$name" "time budget spent (DEADLINE_S=$DEADLINE_S)"; return 0; fi
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  echo "-- $name: $*"
  t0=$(date +%s)
  if [ -n "${STEP_STDOUT:-}" ]; then  # stdout kept apart (e.g. `hashret check --json`), stderr to the log
    timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$STEP_STDOUT" 2>"$log"
  else
    timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$log" 2>&1
  fi
  rc=$?
  tail -n 4 "$log" | sed 's/^/   | /'
  [ "$rc" = 124 ] && echo "   timed out after ${limit}s"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$json" "$log" "$*" >>"$STEPS"
}

HB=("$PY" -m hashret)
ENG=(bench engine "$EXP" --iters "$ITERS" --warmup "$WARMUP" --max-seconds "$MAX_SECONDS")

# 1. engines
step engine-torch-fp32 "$RES/gpu-engine-torch-fp32.json" "${HB[@]}" "${ENG[@]}" --device "$DEV" --backends torch \
  --batches "$BATCHES" --option precision=fp32 --option graph_batches= --label torch-fp32-eager \
  --out "$RES/gpu-engine-torch-fp32.json"
if [ "$DEV" = cuda ]; then
  step engine-torch-fp16 "$RES/gpu-engine-torch-fp16-graphs.json" "${HB[@]}" "${ENG[@]}" --device cuda --backends torch \
    --batches "$BATCHES" --option precision=fp16 --option "graph_batches=$BATCHES" --label torch-fp16-graphs \
    --out "$RES/gpu-engine-torch-fp16-graphs.json"
else
  skip engine-torch-fp16 "fp16 + CUDA graphs need a CUDA GPU"
fi
if ort_has CUDAExecutionProvider; then
  step engine-ort-cuda "$RES/gpu-engine-ort-cuda.json" "${HB[@]}" "${ENG[@]}" --device cuda --backends ort,ort-fp16 \
    --batches "$BATCHES" --label "{backend}@cuda-ep" --out "$RES/gpu-engine-ort-cuda.json"
else
  skip engine-ort-cuda "onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)"
fi
if ort_has TensorrtExecutionProvider; then
  step engine-ort-trt "$RES/gpu-engine-ort-trt.json" "${HB[@]}" "${ENG[@]}" --device tensorrt --backends ort,ort-fp16 \
    --batches "$TRT_BATCHES" --label "{backend}@trt-ep" --out "$RES/gpu-engine-ort-trt.json"
else
  skip engine-ort-trt "onnxruntime has no TensorrtExecutionProvider"
fi
if has tensorrt && [ -f "$EXP/model.plan" ]; then
  step engine-tensorrt "$RES/gpu-engine-tensorrt.json" "${HB[@]}" "${ENG[@]}" --device cuda --backends tensorrt \
    --batches "$BATCHES" --out "$RES/gpu-engine-tensorrt.json"
else
  skip engine-tensorrt "needs the tensorrt package and $EXP/model.plan (hashret export ... --formats tensorrt)"
fi
# The same machine's CPU, for contrast (few batches: it is slow); backends it lacks are listed as skipped.
step cpu-engine "$RES/gpu-machine-cpu-engine.json" "${HB[@]}" "${ENG[@]}" --device cpu --backends torch,ort,openvino \
  --batches 1,8 --iters 5 --out "$RES/gpu-machine-cpu-engine.json"

# 2. search
step search-gpu "$RES/gpu-search.json" "$PY" -m benchmarks.gpu_search --device "$DEV" --sizes "$SEARCH_SIZES" \
  --queries "$SEARCH_QUERIES" --methods "$SEARCH_METHODS" --check-queries 2 --out "$RES/gpu-search.json"
if has faiss; then
  step cpu-search "$RES/gpu-machine-cpu-search.json" "${HB[@]}" bench search --sizes "${SEARCH_SIZES%%,*}" \
    --kinds faiss-flat --queries 20 --k 10,100 --threads 1 --out "$RES/gpu-machine-cpu-search.json"
else
  skip cpu-search "faiss is not installed (pip install faiss-cpu)"
fi

# 3. parity checks against the CPU golden set, gated by the engine's precision
check() {  # check NAME BACKEND DEVICE: its --json result lands in $LOGDIR/check-NAME.json
  local gates
  gates=$("$PY" -m benchmarks.gpu_thresholds "$2" "$3") || { skip "check-$1" "benchmarks.gpu_thresholds failed"; return; }
  # shellcheck disable=SC2086
  STEP_STDOUT="$LOGDIR/check-$1.json" step "check-$1" - "${HB[@]}" check "$EXP" --backend "$2" --device "$3" $gates --json
}
check "torch-$DEV" torch "$DEV"
if ort_has CUDAExecutionProvider; then check ort-cuda ort cuda; check ort-fp16-cuda ort-fp16 cuda; fi
if ort_has TensorrtExecutionProvider; then check ort-trt ort tensorrt; fi
if has tensorrt && [ -f "$EXP/model.plan" ]; then check tensorrt tensorrt cuda; fi
if [ -f "$EXP/model.fp16.onnx" ] && has onnxruntime; then check ort-fp16-cpu ort-fp16 cpu; fi

# 4. the served path: the torch engine on DEV behind gRPC, CPU decode and (when served) nvJPEG decode
serve_steps() {
  case "$SKIP" in *" serve "*) skip serve "SKIP"; return;; esac
  if ! ls "$IMAGES"/*/* >/dev/null 2>&1; then skip serve "no images in $IMAGES (class sub-folders of JPEGs)"; return; fi
  local kind=${GALLERY_KIND:-}
  if [ -z "$kind" ]; then
    kind=$("$PY" - <<'PYEOF'
from serve.gallery import INDEX_KINDS
names = list(INDEX_KINDS.names())
gpu = [n for n in names if any(w in n for w in ("gpu", "cuda", "torch", "cupy"))]
try:
    import faiss  # noqa: F401
except ImportError:
    faiss = None
print(gpu[0] if gpu else "faiss-flat" if "faiss-flat" in names and faiss else "")
PYEOF
)
  fi
  if [ -z "$kind" ]; then skip serve "no index kind usable here (no GPU kind registered, faiss not installed)"; return; fi
  local gal="$LOGDIR/gallery"
  step serve-gallery - "${HB[@]}" index build "$EXP" --data "$IMAGES" --format folder --split database \
    --kind "$kind" --backend torch --device "$DEV" --out "$gal" --no-progress \
    $(case "$kind" in torch-*) echo --search-device "$DEV";; esac)
  [ -f "$gal/manifest.json" ] || { skip serve-load "the gallery was not built"; return; }
  local load=(bench serve --model "$EXP" --gallery "$gal" --concurrency "$SERVE_CONCURRENCY" --seconds "$SERVE_SECONDS"
              --requests 100000 --images "$IMAGES" --clients "$SERVE_CLIENTS")
  # the echo floors add two load runs per level: off unless asked for, to keep the run short
  [ "${SERVE_ECHO:-0}" = 1 ] || load+=(--no-echo)
  local serve_help
  serve_help=$("${HB[@]}" serve --help 2>/dev/null)  # which options this tree's `hashret serve` has
  step serve-cpu-decode "$RES/gpu-serve-cpu-decode.json" "${HB[@]}" "${load[@]}" \
    --server-args "--backend torch --device $DEV" --out "$RES/gpu-serve-cpu-decode.json"
  if grep -q -- '--decode ' <<<"$serve_help"; then
    step serve-nvjpeg "$RES/gpu-serve-nvjpeg.json" "${HB[@]}" "${load[@]}" \
      --server-args "--backend torch --device $DEV --decode $DEV" --out "$RES/gpu-serve-nvjpeg.json"
  else
    skip serve-nvjpeg "hashret serve has no --decode option in this tree"
  fi
  # several server processes on the port: the same two paths, each worker with its own engine on DEV
  if [ "$SERVE_WORKERS" -le 1 ]; then skip serve-workers "SERVE_WORKERS=$SERVE_WORKERS"; return; fi
  if ! grep -q -- '--workers ' <<<"$serve_help"; then
    skip serve-workers "hashret serve has no --workers option in this tree"; return
  fi
  local w=$SERVE_WORKERS
  step serve-cpu-decode-workers "$RES/gpu-serve-cpu-decode-w$w.json" "${HB[@]}" "${load[@]}" \
    --server-args "--backend torch --device $DEV --workers $w" --out "$RES/gpu-serve-cpu-decode-w$w.json"
  if grep -q -- '--decode ' <<<"$serve_help"; then
    step serve-nvjpeg-workers "$RES/gpu-serve-nvjpeg-w$w.json" "${HB[@]}" "${load[@]}" \
      --server-args "--backend torch --device $DEV --decode $DEV --workers $w" --out "$RES/gpu-serve-nvjpeg-w$w.json"
  fi
}
serve_steps

# Summary: one table, gpu.json with every step, and the exit status.
GPU_SH_CMD=$GPU_SH_CMD BATCHES=$BATCHES TRT_BATCHES=$TRT_BATCHES ITERS=$ITERS WARMUP=$WARMUP \
  MAX_SECONDS=$MAX_SECONDS SEARCH_SIZES=$SEARCH_SIZES SEARCH_QUERIES=$SEARCH_QUERIES STEP_TIMEOUT=$STEP_TIMEOUT \
  SERVE_CONCURRENCY=$SERVE_CONCURRENCY SERVE_WORKERS=$SERVE_WORKERS SERVE_CLIENTS=$SERVE_CLIENTS DEADLINE_S=$DEADLINE_S DEVICE=$DEV \
  "$PY" - "$STEPS" "$SKIPS" "$RES" "$EXP" <<'PYEOF'
import json, os, shlex, sys
from pathlib import Path

from benchmarks import machine
from benchmarks.serve_load import CLIENT_BOUND

steps_file, skips_file, out, exp = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]
steps, rows, failed = [], [], []
for line in Path(steps_file).read_text().splitlines():
    name, rc, secs, js, log, cmd = line.split("\t", 5)
    rc = int(rc)
    tail = Path(log).read_text(errors="replace").splitlines()[-15:] if Path(log).is_file() else []
    entry = {"step": name, "rc": rc, "seconds": int(secs), "json": None if js == "-" else js,
             "command": cmd, "output_tail": tail}
    check_json = Path(log).with_suffix(".json")
    if name.startswith("check-") and check_json.is_file():
        try:
            c = json.loads(check_json.read_text())
            entry["check"] = {k: c.get(k) for k in ("backend", "device", "bit_flip", "map_drop", "passed",
                                                    "failures", "verdict", "thresholds")}
        except ValueError:
            entry["check"] = None
    problem = f"exit status {rc}" + (" (timed out)" if rc in (124, 137) else "") if rc else None
    if js != "-" and Path(js).is_file():
        doc = json.loads(Path(js).read_text())
        # a benchmark that skipped everything exits 0 with nothing measured: that is a failure too
        if not doc.get("results") and not problem:
            problem = "no results: " + "; ".join(str(s.get("reason", ""))[:80] for s in doc.get("skipped", []))
        for r in doc.get("results", []):
            if doc.get("benchmark") == "engine":
                rows.append([r.get("label") or r["backend"], r["device"], f"batch {r['batch']}",
                             f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}", f"{r['img_per_s']:.0f} img/s"])
            elif doc.get("benchmark") in ("gpu-search", "search"):
                pq = r["per_query"]
                rows.append([r.get("method") or r.get("label"), r.get("device", "cpu"),
                             f"n={r['size']:,} k={r['k']}", f"{pq['p50_ms']:.3f}", f"{pq['p99_ms']:.3f}",
                             f"recall {r.get('recall', '-')}"])
            elif "concurrency" in r:
                # a load generator busy all the time may have set the pace, not the server
                busy = (r.get("client_cpu") or {}).get("busiest_core_share") or 0
                rows.append([name, os.environ.get("DEVICE", "-"), f"concurrency {r['concurrency']}",
                             str(r.get("p50_ms", "-")), str(r.get("p99_ms", "-")),
                             f"{r.get('rps', r.get('requests_per_s', '-'))} req/s"
                             + (f" (client-bound: {busy:.0%} of a core)" if busy >= CLIENT_BOUND else "")])
        for s in doc.get("skipped", []):
            rows.append([s.get("backend") or s.get("method") or s.get("kind"), s.get("device", "-"), "skipped",
                         "-", "-", str(s.get("reason", ""))[:60]])
    elif js != "-" and not problem:
        problem = f"wrote no {Path(js).name}"
    if name.startswith("check-"):
        c = entry.get("check") or {}
        detail = (f" bit flips {c['bit_flip']:.4f}, mAP drop {c['map_drop']:+.4f}"
                  if isinstance(c.get("bit_flip"), float) and isinstance(c.get("map_drop"), float) else "")
        verdict = "PASS" if rc == 0 else "FAIL (threshold)" if rc == 1 else f"ERROR rc={rc}"
        rows.append([name, c.get("device") or "-", "check", "-", "-", verdict + detail])
    entry["problem"] = problem
    if problem:
        failed.append((name, problem))
    steps.append(entry)
skipped = [dict(zip(("step", "reason"), line.split("\t", 1))) for line in Path(skips_file).read_text().splitlines()]
print()
machine.print_table(["what", "device", "case", "p50 ms", "p99 ms", "result"], rows)
knobs = ("BATCHES", "TRT_BATCHES", "ITERS", "WARMUP", "MAX_SECONDS", "SEARCH_SIZES", "SEARCH_QUERIES", "STEP_TIMEOUT",
         "SERVE_CONCURRENCY", "SERVE_WORKERS", "SERVE_CLIENTS", "DEADLINE_S", "DEVICE")
doc = {**machine.run_meta("gpu", threads={"note": "see each gpu-*.json"},
                          argv=shlex.split(os.environ.get("GPU_SH_CMD", "benchmarks/gpu.sh"))),
       "config": {"exp": exp, **{k.lower(): os.environ.get(k) for k in knobs}},
       "results": [{k: v for k, v in s.items() if k not in ("output_tail", "check")} for s in steps],
       "steps": steps, "skipped_steps": skipped, "failed": [n for n, _ in failed]}
machine.write_result(doc, out / "gpu.json")
print(f"\nwrote {out / 'gpu.json'} (+ the gpu-*.json above); regenerate RESULTS.md with: hashret bench report")
for s in skipped:
    print(f"skipped {s['step']}: {s['reason']}")
if failed:
    print(f"\nFAILED {len(failed)} of {len(steps)} steps:")
    for n, p in failed:
        print(f"  {n}: {p}")
    sys.exit(1)
print(f"\nall {len(steps)} steps passed")
PYEOF
