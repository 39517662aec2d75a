#!/usr/bin/env bash
# Creates .venv and installs qwen-ref into it. `bash scripts/setup.sh` for running, `... test` for the tests.
# torch is pinned first: on this kind of machine torch==2.13.0 (CPU) installs from local disk, while an
# unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python3 -m venv .venv
py=.venv/bin/python
"$py" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
"$py" -c "import torch" 2>/dev/null || "$py" -m pip install -q --disable-pip-version-check "torch==${QWEN_REF_TORCH:-2.13.0}"
if [ -n "$extras" ]; then
  "$py" -m pip install -q --disable-pip-version-check -e ".[$extras]"
else
  "$py" -m pip install -q --disable-pip-version-check -e .
fi
