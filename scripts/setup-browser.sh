#!/usr/bin/env bash
# Headless Chromium for the HTML report's browser test (Debian's `chromium` package). Part of the
# test set-up (scripts/test.sh); not needed to run vesl itself. Idempotent: does nothing when a
# Chromium is already on PATH (or VESL_CHROMIUM names one).
set -euo pipefail
for exe in ${VESL_CHROMIUM:-} chromium chromium-browser google-chrome google-chrome-stable; do
  if command -v "$exe" >/dev/null 2>&1; then
    exit 0
  fi
done
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
    echo "setup-browser: chromium is missing and this user cannot install packages (not root, no sudo);" \
         "install Debian's 'chromium' package, or set VESL_CHROMIUM to a Chromium/Chrome binary" >&2
    exit 1
  fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup-browser: no apt-get here; install Chromium and set VESL_CHROMIUM to its binary" >&2
  exit 1
fi
echo "setup-browser: installing Debian's chromium package (headless browser for the report test)" >&2
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core >/dev/null; then
  $SUDO apt-get update -q >/dev/null
  $SUDO apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi
command -v chromium >/dev/null
