#!/usr/bin/env bash
# img2dataset in a virtualenv of its own (.venv-img2dataset), for the test that runs the real tool
# against images served on 127.0.0.1 and reads its three output layouts. Its pins (pandas 2.x,
# albumentations, wandb, opencv) conflict with the project's lock, so it never shares .venv.
# Part of the test set-up (scripts/test.sh); idempotent: a second run with an unchanged
# requirements/img2dataset.txt only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
venv=.venv-img2dataset
stamp=$venv/.vesl-setup
want=$(sha256sum requirements/img2dataset.txt | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/img2dataset" ]; then
  exit 0
fi
[ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
echo "setup-img2dataset: img2dataset and its pinned dependencies into $venv" >&2
source scripts/install-lib.sh   # install_into: uv where it can be had, else pip
install_into "$venv" -r requirements/img2dataset.txt
NO_ALBUMENTATIONS_UPDATE=1 "$venv/bin/python" -c "import img2dataset" && [ -x "$venv/bin/img2dataset" ]
echo "$want" > "$stamp"
