"""The model with kernels="triton" (under the Triton interpreter on CPU) against its PyTorch path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

CHECK = r"""
import sys, torch, qwen_ref, qwen_ref_kernels
from qwen_ref.engine import generate_ids
from qwen_ref.models.kv_cache import KVCache
assert qwen_ref_kernels.INTERPRET
path = sys.argv[1]
ref, tri = qwen_ref.load(path, decode_linear="torch"), qwen_ref.load(path, kernels="triton", decode_linear="torch")
assert tri.model.backends.name == "triton" and ref.model.backends.name == "torch"
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, 151643, (2, 19), generator=g)
worst = 0.0
with torch.no_grad():
    worst = max(worst, (ref.model(ids) - tri.model(ids)).abs().max().item())  # no cache
    caches = [KVCache(m.config, 2, 32, dtype=torch.float32) for m in (ref.model, tri.model)]
    n = torch.tensor([19, 11])  # rows of different lengths, right-padded
    a, b = (m(ids, cache=c, num_new=n, last_only=True) for m, c in zip((ref.model, tri.model), caches))
    worst = max(worst, (a - b).abs().max().item())
    more = torch.randint(0, 151643, (2, 3), generator=g)  # a cached prefix, then 3 more tokens
    a, b = (m(more, cache=c) for m, c in zip((ref.model, tri.model), caches))
    worst = max(worst, (a - b).abs().max().item())
    for _ in range(3):  # decode
        t = torch.randint(0, 151643, (2, 1), generator=g)
        a, b = (m(t, cache=c) for m, c in zip((ref.model, tri.model), caches))
        worst = max(worst, (a - b).abs().max().item())
prompts = [ids[0].tolist(), ids[1, :11].tolist()]
same = generate_ids(ref.model, prompts, 8) == generate_ids(tri.model, prompts, 8)
print(worst, same)
"""


@pytest.mark.parametrize("preset", ["qwen2.5", "qwen1.5"])
def test_triton_kernels_in_the_model_match_the_torch_path(tiny, preset):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", CHECK, str(tiny(preset))], capture_output=True, text=True, env=env,
                       timeout=900, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    worst, same = r.stdout.split()
    # float32 logits of magnitude ~16: the kernels' online softmax reorders sums, a few ulps at most
    assert float(worst) <= 1e-4, worst
    assert same == "True"


def test_kernels_option_errors(tiny):
    import qwen_ref
    from qwen_ref.errors import CheckpointError

    with pytest.raises(CheckpointError, match="kernels: 'cuda' is not supported"):
        qwen_ref.load(tiny("qwen2.5"), kernels="cuda")
    assert qwen_ref.load(tiny("qwen2.5"), kernels="auto").model.backends.name == "invariant"  # auto: no Triton on CPU
