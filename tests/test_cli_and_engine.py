from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qwen_ref
from qwen_ref.detok import IncrementalDetokenizer, detokenize
from qwen_ref.engine import decode, generate_ids
from qwen_ref.kv_cache import CacheFullError, KVCache

ROOT = Path(__file__).resolve().parents[1]
QWEN_REF = [sys.executable, "-m", "qwen_ref.cli"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*QWEN_REF, *args], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_run_greedy_on_a_checkpoint_matches_the_engine(tiny):
    path = tiny("qwen2.5")
    r = run_cli("run", str(path), "--prompt", "Hello, world!", "--max-tokens", "12")
    assert r.returncode == 0, r.stderr
    q = qwen_ref.load(path)
    ids = generate_ids(q.model, [q.tokenizer.encode("Hello, world!")], 12, stop_ids=q.eos_token_ids)[0]
    assert r.stdout == detokenize(q.tokenizer, ids) + "\n"
    assert r.stdout == q.tokenizer.decode(ids, skip_special_tokens=True) + "\n"
    assert "loading weights" in r.stderr and "12 generated" in r.stderr


def test_run_embedded_default_model():
    r = run_cli("run", "tiny", "--prompt", "The capital of France is", "--max-tokens", "4")
    assert r.returncode == 0, r.stderr
    assert "5 prompt tokens, 4 generated" in r.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "/no/such/checkpoint", "--prompt", "x"], "qwen-ref: error: source: '/no/such/checkpoint'"),
        (["run", "Qwen/Qwen2.5-0.5B-Instruct", "--prompt", "x"], "not in the local Hugging Face cache"),
        (["run", "tiny", "--prompt", "x", "--max-tokens", "0"], "--max-tokens must be >= 1"),
    ],
)
def test_run_errors_are_one_line(args, message):
    r = run_cli(*args)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_rows_stop_independently(tiny):
    model = qwen_ref.load(tiny("qwen2.5")).model
    prompts = [[9707, 11, 1879, 0], [40, 1079]]
    free = generate_ids(model, prompts, 6)
    stop = free[0][2]
    out = generate_ids(model, prompts, [6, 3], stop_ids=[stop])
    assert out[0] == free[0][: free[0].index(stop) + 1]  # the stop token is emitted, then the row ends
    expected = free[1][:3]
    if stop in expected:
        expected = expected[: expected.index(stop) + 1]
    assert out[1] == expected
    steps = list(decode(model, prompts, [2, 0]))
    assert [s.tokens[1] for s in steps] == [None, None] and steps[-1].finished == [True, True]


def test_engine_rejects_empty_prompts(tiny):
    model = qwen_ref.load(tiny("qwen2.5")).model
    with pytest.raises(ValueError, match="at least one token"):
        generate_ids(model, [[]], 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_ids(model, [[1]], -1)


def test_cache_capacity_is_enforced(tiny):
    model = qwen_ref.load(tiny("qwen2.5")).model
    cache = KVCache(model.config, 1, 4, dtype=torch.float32)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        model(torch.tensor([[4]]), cache=cache)
        with pytest.raises(CacheFullError, match="capacity 4"):
            model(torch.tensor([[5]]), cache=cache)
    assert cache.lengths.tolist() == [4]
    assert not any("cache" in k for k in model.state_dict())


def test_incremental_detokenizer_never_splits_a_character(tiny):
    tok = qwen_ref.load(tiny("qwen2.5")).tokenizer
    text = "naïve 日本語 😀🎉 café — 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 <|im_end|> end"
    ids = tok.encode(text)
    d = IncrementalDetokenizer(tok)
    chunks = [d.push(i) for i in ids] + [d.flush()]
    assert "".join(chunks) == text.replace("<|im_end|>", "")
    for c in chunks:
        c.encode("utf-8")  # every chunk is whole characters (no lone surrogates, nothing split)
    # invalid UTF-8 (a lone continuation byte, a truncated 3-byte lead) becomes U+FFFD, the same in pieces
    stray = [next(i for i in range(256) if tok.token_bytes(i) == b) for b in (b"\x80", b"a", b"\xe6", b"b")]
    assert detokenize(tok, stray) == b"\x80a\xe6b".decode("utf-8", errors="replace") == "\ufffda\ufffdb"
