#!/usr/bin/env bash
# The model stages on one GPU, without Ray or the hub (benchmarks/gpu_check.py): one command on a GPU machine
# that has Python 3.12, a CUDA torch, pyarrow and pillow but not the project's other packages.
#
#   bash benchmarks/gpu_check.sh --wheels     # here, with network: the wheels that must travel -> .gpu-wheels/
#   bash benchmarks/gpu_check.sh [ARGS...]    # there: unpack .gpu-wheels/ into .gpu-site/, run gpu_check.py ARGS
#
# The wheels (requirements/gpu-check.txt, ~17 MB): transformers at the project's version, pydantic and what
# they need beyond what that machine has (the list says what it has). Wheels are unpacked with Python's
# zipfile, ahead of the machine's own packages on PYTHONPATH, so no pip is needed there. The JSON goes to
# $OUT when it is set (the device tool's output folder), else to benchmarks/results/.
# The whole run stops after VESL_GPU_CHECK_TIMEOUT_S seconds (default 470).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
wheels=${VESL_GPU_WHEELS:-.gpu-wheels}  # the wheels folder (the tests point it at none)
if [ "${1:-}" = "--wheels" ]; then
  rm -rf "$wheels" && mkdir -p "$wheels"
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any \
    -r requirements/gpu-check.txt -d "$wheels" 2>&1 | grep -v "is ignored: it is neither" || true
  count=$(ls "$wheels"/*.whl | wc -l)
  want=$(grep -c '^[A-Za-z]' requirements/gpu-check.txt)
  [ "$count" = "$want" ] || { echo "gpu_check: $count wheels for $want requirements" >&2; exit 1; }
  echo "gpu_check: $count wheels, $(du -sh "$wheels" | cut -f1), in $wheels/ (carry it to the GPU machine)" >&2
  exit 0
fi
if [ -d "$wheels" ]; then
  site=.gpu-site
  rm -rf "$site" && mkdir -p "$site"
  for w in "$wheels"/*.whl; do "$PYTHON" -m zipfile -e "$w" "$site"; done
  export PYTHONPATH="$PWD/$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PYTHON" -c "import torch, transformers, pydantic, yaml; print('gpu_check: torch', torch.__version__, \
'cuda', torch.cuda.is_available(), '| transformers', transformers.__version__, '| python', \
__import__('platform').python_version())" >&2
args=("$@")
if [ -n "${OUT:-}" ]; then
  args+=(--json "$OUT/gpu_check-$(date -u +%Y-%m-%d).json")
fi
exec timeout --signal=INT --kill-after=15 "${VESL_GPU_CHECK_TIMEOUT_S:-470}" "$PYTHON" benchmarks/gpu_check.py "${args[@]}"
