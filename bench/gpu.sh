#!/usr/bin/env bash
# The CUDA tests and the real-size bench on one NVIDIA GPU, in one command (about 5-8 minutes):
#
#   bash bench/gpu.sh              # from anywhere in a checkout; needs package-registry access only
#   bash bench/gpu.sh --dry-run    # print the plan (works on a machine without a GPU)
#
# 1. A venv (${LW_GPU_VENV:-.venv-comfyui-gpu}, made with --system-site-packages so a preinstalled CUDA
#    torch is used as it is) with the pack and its test extras, plus ComfyUI's requirements when a
#    ComfyUI checkout is found ($COMFYUI_PATH, else ../shared/comfyui-0.33.0).
# 2. The CUDA tests: the test files whose tests skip with "needs a CUDA GPU" elsewhere. A CUDA test that
#    still skips here (torch without CUDA) fails the script.
# 3. The bench on CUDA at the sizes users train at: SD1.5 at 512 px (real512), SDXL at 1024 px (sdxl),
#    the Flux-shaped DiT at 512 px (flux512); every model is built with random weights (nothing is
#    downloaded). The table goes to bench/RESULTS_GPU.md (--out FILE to change). Without ComfyUI only the
#    standalone engine runs (at real512).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
DRY=0
OUT=bench/RESULTS_GPU.md
SIZES=${LW_GPU_SIZES:-real512,sdxl,flux512}
RUNS=${LW_GPU_RUNS:-2}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT=$2; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see bash bench/gpu.sh --help)" >&2; exit 2 ;;
  esac
  shift
done

VENV=${LW_GPU_VENV:-$REPO/.venv-comfyui-gpu}  # .venv-comfyui-*/ is git-ignored
COMFY=${COMFYUI_PATH:-}
if [ -z "$COMFY" ] && [ -f "$REPO/../shared/comfyui-0.33.0/main.py" ]; then
  COMFY=$(cd "$REPO/../shared/comfyui-0.33.0" && pwd)
fi
if [ -n "$COMFY" ] && [ ! -f "$COMFY/comfy/sd.py" ]; then
  echo "COMFYUI_PATH=$COMFY is not a ComfyUI checkout (no comfy/sd.py)" >&2
  exit 2
fi
CUDA_TESTS=$(grep -rl --include='*.py' "needs a CUDA GPU" tests | sort | tr '\n' ' ')
BENCH=(-m bench train --sizes "$SIZES" --real-runs "$RUNS" --no-flops --device cuda --out "$OUT")
if [ -n "$COMFY" ]; then BENCH+=(--comfyui "$COMFY"); else BENCH+=(--comfyui "$REPO/no-comfyui"); fi
REQS=(-e "$REPO[test]")
[ -n "$COMFY" ] && REQS+=(-r "$COMFY/requirements.txt")

started=$(date +%s)
phase() { echo "=== [$(( $(date +%s) - started )) s] $*"; }

if [ "$DRY" = 1 ]; then
  phase "dry run: nothing is installed or run"
  echo "venv:       $VENV ($([ -x "$VENV/bin/python" ] && echo "exists, reused" || echo "would be created with --system-site-packages"))"
  echo "install:    $VENV/bin/pip install ${REQS[*]}"
  echo "ComfyUI:    ${COMFY:-none found (COMFYUI_PATH unset, no ../shared/comfyui-0.33.0): engine only}"
  echo "CUDA tests: $VENV/bin/python -m pytest -rs $CUDA_TESTS"
  echo "bench:      $VENV/bin/python ${BENCH[*]}"
  # The bench's own plan, with whichever Python is at hand (it imports nothing heavy for --plan).
  PY=$([ -x "$VENV/bin/python" ] && echo "$VENV/bin/python" || command -v python3)
  phase "the bench's plan"
  "$PY" "${BENCH[@]}" --plan
  exit 0
fi

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

phase "venv $VENV"
[ -x "$VENV/bin/python" ] || python3 -m venv --system-site-packages "$VENV"
# A torch already here (system site or an earlier run) stays: ComfyUI's requirements name torchvision and
# torchaudio unpinned, and their newest builds would otherwise pull a newer torch (a 2-3 GB download).
keep=$(mktemp)
"$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" >"$keep" 2>/dev/null || true
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/pip" install -q -c "$keep" "${REQS[@]}"
"$VENV/bin/python" - <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} in this venv sees no CUDA GPU (torch.version.cuda={torch.version.cuda}); "
             "install a CUDA build of torch into the venv, or run on a machine with an NVIDIA driver")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
EOF

phase "CUDA tests: $CUDA_TESTS"
log=$(mktemp)
set +e
"$VENV/bin/python" -m pytest -q -rs -p no:cacheprovider $CUDA_TESTS 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
if grep -q "needs a CUDA GPU" "$log"; then
  echo "a CUDA test skipped on this GPU machine (above): torch does not see the GPU" >&2
  exit 1
fi
[ "$rc" = 0 ] || { echo "CUDA tests failed (exit $rc)" >&2; exit "$rc"; }

phase "bench: ${BENCH[*]}"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)} "$VENV/bin/python" "${BENCH[@]}"

phase "done: table in $OUT"
