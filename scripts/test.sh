#!/usr/bin/env bash
# One command: set up .venv, then run the whole test suite (CPU, tiny offline models, local Ray,
# a moto S3 server on loopback, headless Chromium for the report). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup-browser.sh   # headless Chromium for the HTML report test
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
