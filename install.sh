#!/usr/bin/env bash
# One-time set-up on a fresh Debian machine (idempotent): chromium from Debian, the CPU build of torch, then the
# project with its test extras. Never `playwright install`: Playwright drives Debian's /usr/bin/chromium.
# Elsewhere, point TORCH_INDEX_URL at PyTorch's CPU wheel index so that pip does not pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
if ! command -v chromium >/dev/null 2>&1; then
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q chromium
fi
python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
pip install -q -e ".[test]"
