#!/usr/bin/env bash
# One command: set up .venv, lint, then run the whole test suite (CPU, tiny offline models, local Ray,
# a moto S3 server on loopback, headless Chromium for the report, the real img2dataset in a venv of
# its own). Extra arguments go to pytest.
#   bash scripts/test.sh --fast   the fast loop: lint, import contracts + every test that needs no Ray, subprocess,
#                                 server or browser (pytest -m "not slow"), no browser/img2dataset set-up
set -euo pipefail
cd "$(dirname "$0")/.."
fast=0
if [ "${1:-}" = "--fast" ]; then
  fast=1
  shift
fi
if [ "$fast" = 1 ]; then
  bash scripts/setup.sh
else
  # the three set-ups at once (each mostly one process unpacking wheels): a fresh clone's set-up takes the
  # longest one's time, not the sum; each one's failure fails the suite
  bash scripts/setup.sh & main_setup=$!
  bash scripts/setup-browser.sh & browser=$!   # headless Chromium for the HTML report test
  bash scripts/setup-img2dataset.sh & img2dataset=$!   # .venv-img2dataset: the real img2dataset, for the hand-off test
  failed=0
  for job in "$main_setup" "$browser" "$img2dataset"; do
    wait "$job" || failed=1
  done
  [ "$failed" = 0 ] || { echo "test: a set-up step failed (its lines above say which)" >&2; exit 1; }
fi
.venv/bin/ruff check .   # lint + import order (pyproject.toml [tool.ruff.lint])
.venv/bin/lint-imports --no-cache   # the layers only point down, no cycles (pyproject.toml [tool.importlinter])
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ "$fast" = 1 ]; then
  VESL_FAST=1 exec .venv/bin/python -m pytest -m "not slow" "$@"
fi
exec .venv/bin/python -m pytest --durations=25 "$@"   # the 25 slowest tests, at the end
