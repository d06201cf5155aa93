#!/usr/bin/env bash
# Re-run every CPU result in benchmarks/results/ with today's code, on one machine, in one sitting,
# so that the README's tables compare like with like; then regenerate RESULTS.md and the README's
# generated blocks (`hashret bench report`).
#
#   bash benchmarks/rerun_all.sh                    # everything, about 80 min on 2 idle cores
#   STREAMS=timing bash benchmarks/rerun_all.sh     # only the latency/throughput files (~30 min)
#   HASHRET_RERUN_DIR=/scratch/rr bash benchmarks/rerun_all.sh
#
# Run it from a clean checkout (committed code): a result must name the commit that produced it.
# Every step writes into $HASHRET_RERUN_DIR/results, and only when all of them succeeded are the
# files copied into benchmarks/results/ together: the first file written there would make the tree
# differ from its commit, and the next benchmark would refuse to write (or record a dirty tree);
# a failed sitting also leaves the committed files as they were. It stops at the first failing step. Before each step it prints the 1-minute load
# average (every results file records it too): anything above the CPU count means other work was
# competing, and those numbers are not comparable with the rest.
#
# The wall times in the comments are estimates for the 2-core VM the current files come from,
# taken from the durations recorded in them (or their dates, where none was recorded).
# GPU results (benchmarks/gpu.sh, benchmarks/device_run.sh) need a CUDA host and are not re-run here.
set -euo pipefail

cd "$(dirname "$0")/.."
DATA=${HASHRET_DATA:-../shared/datasets/grocery}
W=${HASHRET_RERUN_DIR:-/tmp/hashret-rerun}   # models, galleries and scratch; never inside the repo
R=$W/results                                  # copied into benchmarks/results/ at the end
rm -rf "$R"
mkdir -p "$R"

if ! git diff --quiet HEAD --; then
    echo "error: uncommitted changes to tracked files: commit them first, so every result names its code" >&2
    exit 2
fi
[ -d "$DATA" ] || { echo "error: dataset $DATA not found: set HASHRET_DATA" >&2; exit 2; }

step() {  # step NAME COMMAND...: one timed step, with the load it started under
    local name=$1; shift
    echo
    echo "== $(date -u +%H:%M:%S) $name | load average $(cut -d' ' -f1-3 /proc/loadavg) | $(nproc) CPUs"
    echo "   $*"
    local t0=$SECONDS
    "$@"
    echo "== $name: $((SECONDS - t0)) s"
}

# Two streams: timing (latency and throughput) and quality (mAP: the table, parity, the demo, the
# backbones). By default they run one after the other (about 80 min on 2 idle cores), so the
# timings see a quiet machine. STREAMS="quality" (or "timing") runs one of them; PARALLEL=1 runs them
# side by side (about 50 min): mAP does not depend on load, but timings then share the cores with
# training, which every file's load average shows. Left out, and removed from the pages rather
# than kept stale: parity on the full split (~15 min; the subset is what `hashret export` reports),
# and the 16-bit engine.json / serve.json runs that the 64-bit effnet files supersede.

timing_stream() {
    # The 64-bit DCH efficientnet-lite0 model of the headline figures (~1 min with the feature
    # cache, ~3 min without), its export (~3 min) and its Grocery database gallery (~1 min).
    step "train dch64" hashret train --data "$DATA" --format grocery --backbone efficientnet-lite0 --method dch \
        --bits 64 --seed 0 --out "$W/runs/dch64" --no-progress
    step "export dch64" hashret export "$W/runs/dch64" --out "$W/exp/dch64" --no-parity
    step "gallery dch64" hashret index build "$W/exp/dch64" --data "$DATA" --format grocery --split database --overwrite \
        --out "$W/gal/dch64"
    # ~2 min
    step "engine effnet dch64" hashret bench engine "$W/exp/dch64" --backends openvino-int8,ort-int8,ort,openvino \
        --batches 1,8,32 --iters 30 --out "$R/engine-effnet-dch64.json"
    # ~5 min: 4 concurrency levels x 1,000 requests, the engine baseline and the bare echo server
    step "serve effnet dch64" hashret bench serve --model "$W/exp/dch64" --gallery "$W/gal/dch64" \
        --server-args '--backend openvino-int8' --concurrency 1,4,16,64 --requests 1000 \
        --images "$DATA/dataset/test" --out "$R/serve-effnet-dch64.json"
    # ~4 min (the HNSW build of 1M codes dominates); 10M codes left out for time
    step "search" hashret bench search --sizes 100000,1000000 --queries 300 --out "$R/search.json"
    # ~1 min: the FAISS flat bar alone
    step "search flat 1M" hashret bench search --sizes 1000000 --kinds faiss-flat --queries 300 \
        --out "$R/search-flat-1m.json"
    # ResNet50 timings with random weights: only the timings are wanted, and they do not depend on
    # the weights; a few images and one epoch make a valid run to export. ~4 min.
    step "train resnet50 (random weights)" hashret train --data "$DATA" --format grocery --backbone resnet50 \
        --weights none --method dch --bits 64 --limit 64 --epochs 1 --seed 0 --out "$W/runs/r50-random" --no-progress
    step "export resnet50" hashret export "$W/runs/r50-random" --out "$W/exp/r50-random" --formats onnx,onnx-int8 \
        --golden 32 --calib 32 --no-parity
    step "engine resnet50" hashret bench engine "$W/exp/r50-random" --backends ort,ort-int8,openvino-int8 --batches 1 \
        --threads 2 --iters 30 --out "$R/engine-resnet50-random.json"
    # ~5 min: 240 s of mixed load at concurrency 64 on a 1,000-item gallery
    step "gallery soak" hashret index build "$W/exp/dch64" --data "$DATA" --format grocery --split database --overwrite \
        --limit 1000 --out "$W/gal/soak"
    step "soak 240 s" python -m benchmarks.soak --model "$W/exp/dch64" --gallery "$W/gal/soak" --seconds 240 \
        --images "$DATA/dataset/test" --window 20 --out "$R/soak-effnet-lite0-64bit-240s.json"
    # ~1 min, ~2 min, ~8 min (200,000 Upserts through a real server)
    step "snapshot replay" hashret bench snapshot --part replay --out "$R/snapshot-replay.json"
    step "snapshot write-wait" hashret bench snapshot --part write-wait --out "$R/snapshot-write-wait.json"
    step "snapshot upserts" hashret bench snapshot --part upserts --out "$R/snapshot-upserts.json"
    # ~6 min: every Grocery image through torch eager (~210 s on 2 idle cores), OpenVINO and ORT fp32
    step "extraction" python -m benchmarks.extract_bench --data "$DATA" --out "$R/extract-effnet-lite0.json"
}

quality_stream() {
    # ~30 min: the efficientnet-lite0 grid (27 runs) and the efficientnet-lite2 csq rows (a first
    # feature extraction of 5,421 images, then 9 runs). No --readme: the report below renders it.
    step "quality table" python -m train.table --data "$DATA" --out "$R/train_table.json" --keep-runs "$W/table-runs"
    # ~10 min: three short runs (16/32/64 bits, 5 epochs) and their golden-set parity
    step "parity across bits" hashret bench parity --bits 16,32,64 --epochs 5 --golden 128 --calib 64 \
        --latency-runs 5 --data "$DATA" --workdir "$W/parity-bits" --out "$R/parity.json"
    # ~5 min: the README's parity table, 500 queries x 1,000 database images (as `hashret export`
    # samples them), on the timing stream's model (waits for its export)
    local waited=0
    until [ -f "$W/gal/dch64/manifest.json" ]; do
        sleep 10; waited=$((waited + 10))
        [ "$waited" -lt 3600 ] || { echo "error: no $W/exp/dch64 after an hour (the timing stream failed?)" >&2; return 1; }
    done
    step "parity subset" hashret bench parity --exps "$W/exp/dch64" --split subset --latency-runs 20 \
        --data "$DATA" --out "$R/parity-effnet-dch64-subset.json"
    # ~10 min: a fresh extraction per backbone, fp32 engine timings, and a training run each
    step "backbones" python -m benchmarks.backbones --data "$DATA" --backbones efficientnet-lite0,efficientnet-lite2 \
        --out "$R/backbones.json"
    # ~6 min: train, export, gallery, 2,485 served queries, snap-to-shop; written with its provenance
    step "demo" hashret demo --data "$DATA" --workdir "$W/demo" --fresh --results "$R/demo-csq64-summary.json"
}

mkdir -p "$W/logs"
STREAMS=${STREAMS:-timing quality}
if [ "${PARALLEL:-0}" != 1 ]; then
    for stream in $STREAMS; do "${stream}_stream"; done
else
    pids=()
    for stream in $STREAMS; do
        echo "$stream stream log: $W/logs/$stream.log"
        "${stream}_stream" >"$W/logs/$stream.log" 2>&1 &
        pids+=("$!")
    done
    rc=0
    for pid in "${pids[@]}"; do wait "$pid" || { rc=$?; echo "error: a stream failed (see $W/logs/)" >&2; }; done
    [ "$rc" = 0 ] || exit "$rc"
fi

# ---------------------------------------------------------------- the pages
step "collect" cp "$R"/*.json benchmarks/results/  # only what this sitting wrote
step "report" hashret bench report
step "report check" hashret bench report --check --fail-on-stale
