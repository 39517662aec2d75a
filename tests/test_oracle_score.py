"""score (qwen_ref.oracle.score): the reference's numbers for given tokens, teacher-forced in chunks."""

from __future__ import annotations

import math

import pytest
import torch

from qwen_ref.oracle import ScoreInputError, next_token_logits, raw_logprobs, score
from qwen_ref.qwen import load
from qwen_ref.sampling import distribution


@pytest.fixture(scope="module")
def ref(tiny):
    return load(tiny("qwen2.5"))


@pytest.fixture(scope="module")
def ref64(tiny):
    return load(tiny("qwen2.5"), dtype="float64")


def test_score_is_the_reference_teacher_forced(ref):
    prompt, tokens = [9707, 11], [1879, 0, 9707]
    params = {"temperature": 0.7, "top_k": 3, "repetition_penalty": 1.2}
    rows = list(score(ref, [{"prompt_ids": prompt, "token_ids": tokens, "params": params, "id": "a"},
                            {"text": "Hello, world!"}], top_n=3))
    assert [(r["sequence"], r["position"], r["step"]) for r in rows] == [(0, 2, 0), (0, 3, 1), (0, 4, 2),
                                                                        (1, 1, 0), (1, 2, 1), (1, 3, 2)]
    with torch.no_grad():
        logits = ref.model(torch.tensor([prompt + tokens]))[0]
    for r in rows[:3]:
        lp = torch.log_softmax(logits[r["position"] - 1].double(), -1)
        assert r["id"] == "a" and r["token"] == tokens[r["step"]]
        assert r["logprob"] == pytest.approx(float(lp[r["token"]]), abs=1e-5)
        # score's logits come from chunked teacher forcing, these from one forward: equal up to float rounding,
        # so the rank is pinned down up to the logprobs within that rounding of the token's
        above, near = int((lp > lp[r["token"]] + 1e-5).sum()), int((lp - lp[r["token"]]).abs().le(1e-5).sum())
        assert 1 + above <= r["rank"] <= above + near
        assert [t["id"] for t in r["top"]] == torch.topk(lp, 3).indices.tolist()
        p = distribution(logits[r["position"] - 1], params, prompt, tokens[: r["step"]])[r["token"]]
        assert r["in_support"] == bool(p > 0)
        assert r["final_logprob"] == (pytest.approx(math.log(p), abs=1e-5) if p > 0 else None)
    assert rows[3]["text"] == "," and "final_logprob" not in rows[3]
    chat = list(score(ref, [{"request": {"messages": [{"role": "user", "content": "Hi"}], "temperature": 0},
                             "completion": "Hello"}], top_n=0))
    templated = ref.tokenizer.encode("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
                                     "assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    (row,) = chat
    assert row["position"] == len(templated) and row["token"] == 9707 and row["top"] == []
    assert row["in_support"] == (row["rank"] == 1)  # temperature 0: only the argmax can be produced


def test_next_token_logits_chunks_equal_one_forward(ref64):
    ids = [9707, 11, 1879, 0, 576, 9707, 11, 1879]
    chunked = torch.stack(list(next_token_logits(ref64, ids, 2, chunk=2)))
    with torch.no_grad():
        full = ref64.model(torch.tensor([ids]))[0, 1:-1]
    assert chunked.shape == full.shape and chunked.dtype == torch.float64
    assert (raw_logprobs(chunked) - raw_logprobs(full)).abs().max() < 1e-10


def test_score_rejects_bad_sequences_by_name(ref):
    with pytest.raises(ScoreInputError, match="sequence 0: token id 999999 is outside"):
        list(score(ref, [([1], [999999])]))
    with pytest.raises(ScoreInputError, match="sequence 1: needs prompt_ids, prompt, request or text"):
        list(score(ref, [([1], [2]), {"completion": "x"}]))
    with pytest.raises(ScoreInputError, match="sequence 0: params: top_k"):
        list(score(ref, [{"prompt_ids": [1], "token_ids": [2], "params": {"top_k": 0}}]))

