"""Layer streaming (load(..., offload="disk")): the same logits, tokens and scores as the in-memory model, bit for
bit, with only the embeddings, the final norm and lm_head resident between layers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qwen_ref
from qwen_ref.errors import CheckpointError
from qwen_ref.models.kv_cache import KVCache
from qwen_ref.oracle.score import score

PRESETS = ["qwen2.5", "qwen1.5", "qwen2.5-coder-32b-shape", "sliding", "yarn"]
ROOT = Path(__file__).resolve().parents[1]


def _resident(model) -> set[str]:
    return {name for name, p in model.named_parameters(remove_duplicate=False) if p.device.type != "meta"}


@pytest.mark.parametrize("preset", PRESETS)
def test_streamed_logits_equal_the_in_memory_model(tiny, preset):
    # streamed layers run torch's linears (the default "auto" resolves to them with offload): so does the reference
    memory, streamed = qwen_ref.load(tiny(preset), decode_linear="torch"), qwen_ref.load(tiny(preset), offload="disk")
    ids = torch.tensor([list(range(200, 260))])
    assert torch.equal(memory.model(ids), streamed.model(ids))
    # through the KV cache, chunk by chunk, then one decode step
    caches = [KVCache(q.model.config, 1, 64, dtype=q.dtype) for q in (memory, streamed)]
    for start in (0, 20, 50):
        piece = ids[:, start : start + (20 if start < 40 else 10)]
        a, b = (q.model(piece, cache=c) for q, c in zip((memory, streamed), caches))
        assert torch.equal(a, b)
    assert _resident(streamed.model) == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    assert streamed.model.streamer.bytes_read > 0


@pytest.mark.parametrize("preset", ["qwen2.5", "qwen1.5"])
def test_streamed_generation_and_scores_equal(tiny, preset):
    # streamed layers run torch's linears (the default "auto" resolves to them with offload): so does the reference
    memory, streamed = qwen_ref.load(tiny(preset), decode_linear="torch"), qwen_ref.load(tiny(preset), offload="disk")
    body = {"messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 12, "seed": 5,
            "temperature": 1.0}
    assert qwen_ref.generate(streamed, body) == qwen_ref.generate(memory, body)
    assert qwen_ref.generate(streamed, body, n=3) == qwen_ref.generate(memory, body, n=3)
    ids = memory.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 4)
    item = [{"prompt_ids": ids[:5], "token_ids": ids[5:]}]
    # a streamed model scores a sequence in one pass; the in-memory one with the same single chunk agrees
    assert list(score(streamed, item)) == list(score(memory, item, chunk=len(ids)))


@pytest.mark.parametrize("options", [{"offload": "ram"}, {"offload": "disk", "decode_linear": "invariant"},
                                     {"offload": "disk", "lora": "some-adapter"}])
def test_offload_refuses_what_it_cannot_do(tiny, options):
    with pytest.raises(CheckpointError, match="offload"):
        qwen_ref.load(tiny("qwen2.5"), **options)


def test_the_cli_takes_offload(tiny):
    path = tiny("qwen2.5")
    args = ["run", str(path), "--prompt", "Hello", "--raw", "--temperature", "0", "--max-tokens", "6"]
    runs = [subprocess.run([sys.executable, "-m", "qwen_ref.cli", *args, *extra], capture_output=True, text=True,
                           timeout=300, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            for extra in (["--decode-linear", "torch"], ["--offload", "disk"])]
    assert all(r.returncode == 0 for r in runs), runs[1].stderr
    assert json.loads(runs[0].stdout) == json.loads(runs[1].stdout)


def test_sharded_checkpoints_stream_too(tmp_path):
    from qwen_ref.checkpoint.tiny import PRESETS, make_tiny_checkpoint, write_sharded_checkpoint

    # one shard per layer, written tensor by tensor: the same random weights as the single-file checkpoint
    sharded = write_sharded_checkpoint(PRESETS["qwen2.5"].config, tmp_path / "sharded", dtype="float32")
    single = make_tiny_checkpoint("qwen2.5", tmp_path / "single")
    ids = torch.tensor([list(range(300, 340))])
    # streaming runs torch's linears (decode_linear="auto" resolves to "torch" with offload)
    expected = qwen_ref.load(single, decode_linear="torch").model(ids)
    assert torch.equal(qwen_ref.load(sharded, offload="disk").model(ids), expected)
    assert torch.equal(qwen_ref.load(sharded).model(ids), qwen_ref.load(single).model(ids))
