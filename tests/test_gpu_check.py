"""scripts/gpu_check.sh on a machine without a GPU: one line that says so, exit 0 (with a GPU it runs the CUDA
tests and benchmarks; see the script)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script runs the whole check")
def test_without_a_gpu_it_says_so_in_one_line_and_exits_0():
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                         timeout=120, env={"PATH": "/usr/bin:/bin", "QWEN_REF_PYTHON": sys.executable})
    assert run.returncode == 0, run.stderr
    (line,) = run.stdout.splitlines()
    assert json.loads(line) == {"gpu_check": "skipped", "reason": f"no CUDA GPU visible to {sys.executable}"}
