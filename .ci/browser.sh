#!/usr/bin/env bash
# Headless Chromium for the browser tests (tests/browser.py): installs Debian's
# chromium when no chromium binary is on PATH. Needs root; without it, the
# browser tests skip with a reason.
set -euo pipefail

if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo ".ci/browser.sh: no chromium and not root; the browser tests will skip"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium fonts-dejavu-core >/dev/null
chromium --version
