#!/usr/bin/env bash
# One command: set up .venv, then run the whole test suite (CPU, tiny offline models, local Ray,
# a moto S3 server on loopback, headless Chromium for the report, the real img2dataset in a venv of
# its own). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup-browser.sh   # headless Chromium for the HTML report test
bash scripts/setup-img2dataset.sh   # .venv-img2dataset: the real img2dataset, for the hand-off test
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
