#!/usr/bin/env bash
# Build the git-ignored device/ folder that travels with the source tree to a bare, offline CUDA
# host (../shared/GPU.md): what benchmarks/device_run.sh needs there and the stock image lacks.
#
#   benchmarks/make_device_bundle.sh [DEST]        (DEST default: device; needs network for pip)
#
#   DEST/whl/     wheels for the host's Python (HOST_PYTHON_VERSION, 3.12), no dependencies:
#                 grpcio + protobuf at this tree's versions (serve/_proto was generated for them,
#                 and the generated code refuses an older runtime), grpcio-health-checking,
#                 grpcio-reflection (the server's health/reflection services) and
#                 efficientnet-lite-pytorch (the torch backbone; the weights package is not needed:
#                 an export rebuilds the network without weights, then loads model.pt)
#   DEST/exp/     a small EXP: manifest.json, model.pt, model.onnx (the model id, and `hashret
#                 check` verifies every file the manifest lists), golden.npz (GOLDEN images) from a
#                 --limit training run on the Grocery photos (effnet-lite0, BITS bits)
#   DEST/images/  IMAGES Grocery JPEGs in class folders, for the served-path gallery and load
# and .cache/device-rehearsal-whl/ (not in DEST: it never travels): the same pins for this
# machine's Python, for the rehearsal below.
#
# Then rehearse here, exactly as the host will run it but on the CPU, with every module the host
# lacks made unimportable:
#   SIMULATE_HOST=1 ALLOW_NO_GPU=1 WHEELS=.cache/device-rehearsal-whl benchmarks/device_run.sh /tmp/gpu-rehearsal
# Knobs (environment): PYTHON (python3), HASHRET_DATA (the Grocery folder), BITS (64), LIMIT (64),
# GOLDEN (64), IMAGES (64), HOST_PYTHON_VERSION (3.12), MAX_MIB (64: bundle + tracked tree).
set -euo pipefail

if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 2; fi
ORIG=$PWD
cd "$(dirname "$0")/.."
ROOT=$PWD
DEST=${1:-device}
case "$DEST" in /*) ;; *) DEST=$ORIG/$DEST;; esac
PY=${PYTHON:-python3}
BITS=${BITS:-64}
LIMIT=${LIMIT:-64}
GOLDEN=${GOLDEN:-64}
N_IMAGES=${IMAGES:-64}
HOST_PY=${HOST_PYTHON_VERSION:-3.12}
MAX_MIB=${MAX_MIB:-64}
DATA=${HASHRET_DATA:-$ROOT/../shared/datasets/grocery}
[ -d "$DATA" ] || { echo "error: Grocery dataset not found at $DATA: set HASHRET_DATA" >&2; exit 2; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/hashret-bundle.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
REHEARSAL=$ROOT/.cache/device-rehearsal-whl
rm -rf "$DEST" "$REHEARSAL"
mkdir -p "$DEST/whl" "$DEST/exp" "$DEST/images" "$REHEARSAL"

# Pins: what this tree runs with, so generated code and runtime agree on the host too.
mapfile -t PINS < <("$PY" - <<'EOF'
from importlib.metadata import version
for d in ("grpcio", "protobuf", "grpcio-health-checking", "grpcio-reflection", "efficientnet-lite-pytorch"):
    print(f"{d}=={version(d)}")
EOF
)
echo "== wheels for Python $HOST_PY: ${PINS[*]}"
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$HOST_PY" --implementation cp "${PLAT[@]}" \
  -d "$DEST/whl" "${PINS[@]}"
LOCAL_PY=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$LOCAL_PY" --implementation cp "${PLAT[@]}" \
  -d "$REHEARSAL" "${PINS[@]}"
# The host install resolves from the folder alone: prove it now, for the host's Python.
"$PY" -m pip install -q --dry-run --no-index --no-deps --only-binary=:all: --python-version "$HOST_PY" \
  --implementation cp "${PLAT[@]}" --target "$WORK/site" "$DEST"/whl/*.whl

echo "== a small EXP (efficientnet-lite0, $BITS bits, --limit $LIMIT)"
"$PY" -m hashret train --data "$DATA" --format grocery --backbone efficientnet-lite0 --bits "$BITS" --hidden 256 \
  --limit "$LIMIT" --epochs 3 --device cpu --out "$WORK/run" --no-progress
"$PY" -m hashret export "$WORK/run" --out "$WORK/exp" --formats onnx --golden "$GOLDEN" --no-parity --no-slim
cp "$WORK/exp/manifest.json" "$WORK/exp/model.pt" "$WORK/exp/model.onnx" "$WORK/exp/golden.npz" "$DEST/exp/"

echo "== $N_IMAGES Grocery photos in class folders"
"$PY" - "$DATA" "$DEST/images" "$N_IMAGES" <<'EOF'
import shutil, sys
from pathlib import Path
from hashret.datasets import read_dataset

data, dest, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
splits = read_dataset(data, "grocery")
by_class = {}
for s in splits.database:
    by_class.setdefault(s.label, []).append(s)
# two photos per class: the gallery then holds a true neighbour for every query
picked = [s for v in by_class.values() if len(v) >= 2 for s in v[:2]][:n]
for s in picked:
    folder = dest / f"class{int(s.label):03d}"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(s.path, folder / Path(s.path).name)
print(f"{len(picked)} images in {len({s.label for s in picked})} classes")
EOF

cat >"$DEST/README.txt" <<EOF
Built by benchmarks/make_device_bundle.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ) from $(git rev-parse --short HEAD 2>/dev/null || echo '?').
On the CUDA host, from the repository root: bash benchmarks/device_run.sh RESULTS_DIR
Wheels: ${PINS[*]}
EOF

bundle=$(du -sk "$DEST" | cut -f1)
tracked=$(git ls-files -z | du -ck --files0-from=- 2>/dev/null | tail -1 | cut -f1)
total_mib=$(( (bundle + tracked + 1023) / 1024 ))
du -sh "$DEST"/* | sed 's/^/   /'
echo "== device bundle $(( bundle / 1024 )) MiB + tracked tree $(( tracked / 1024 )) MiB = ${total_mib} MiB (limit ${MAX_MIB} MiB)"
if [ "$total_mib" -ge "$MAX_MIB" ]; then echo "error: over ${MAX_MIB} MiB" >&2; exit 1; fi
echo "rehearse: SIMULATE_HOST=1 ALLOW_NO_GPU=1 WHEELS=$REHEARSAL benchmarks/device_run.sh /tmp/gpu-rehearsal"
