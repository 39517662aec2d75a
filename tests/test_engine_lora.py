"""Per-request LoRA in the engine's shared batch: plain requests and requests with different adapters decode
together, each LoRA row follows PEFT's unmerged forward, and a hang-up frees its row at the next step."""

from __future__ import annotations

import pytest
import torch
from lora_helpers import QKVO_MLP, hf_base, make_peft_adapter

import qwen_ref
from qwen_ref.engine import Engine
from qwen_ref.workers_ai.output import Response
from qwen_ref.workers_ai.request import prepare

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore")
# float32 logits against PEFT's unmerged forward: the base model alone is within ~1e-5 of transformers on these
# shapes (tests/test_model_vs_hf.py), and the LoRA branch adds one more rounding of that size
PEFT_ATOL = 2e-5


@pytest.fixture(scope="module")
def adapters(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-adapters")
    base = tiny("qwen2.5")
    make_peft_adapter(base, dict(r=4, lora_alpha=16, target_modules=QKVO_MLP), {}, root / "alpha", seed=1)
    make_peft_adapter(base, dict(r=8, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"]), {},
                      root / "beta", seed=2)
    return root


def bodies() -> list[dict]:
    plain = [{"prompt": f"Question {i}", "max_tokens": 10, "seed": 10 + i, "temperature": 1.0} for i in range(8)]
    lora = [{"prompt": "Tell me all about PEP-8", "max_tokens": 10, "temperature": 0, "lora": name}
            for name in ("alpha", "beta")]
    return plain[:4] + lora[:1] + plain[4:] + lora[1:]


@pytest.mark.parametrize("decode_linear", ["torch", "invariant"])
def test_eight_plain_and_two_adapters_in_one_batch(tiny, adapters, decode_linear):
    qwen = qwen_ref.load(tiny("qwen2.5"), lora_dir=adapters, decode_linear=decode_linear)
    work = bodies()
    alone = [qwen_ref.generate(qwen, b) for b in work]
    forwards: list[tuple[int, int]] = []
    hook = qwen.model.register_forward_pre_hook(lambda m, args: forwards.append(tuple(args[0].shape)))
    prepared = [prepare(qwen, b) for b in work]
    responses = [Response(qwen.tokenizer, p) for p in prepared]
    engine = Engine(qwen.model, max_running=16, prefill_chunk=256)  # every prompt in one chunk, in step one
    for p, r in zip(prepared, responses):
        engine.add(p.engine_request(qwen), r.push)
    try:
        engine.step()
        assert engine.stats()["active"] == 10  # all ten run together from the first step
        while engine.has_work():
            engine.step()
    finally:
        hook.remove()
    # exact: each row, LoRA or not, is bit for bit the request alone
    assert [r.result() for r in responses] == alone
    if decode_linear == "invariant":  # and the decode steps are shared forwards over plain and LoRA rows
        assert max(b for b, t in forwards if t == 1) == 10


@pytest.mark.parametrize("name", ["alpha", "beta"])
def test_a_lora_request_follows_peft_unmerged(tiny, adapters, name):
    """The engine's greedy tokens for a LoRA request, teacher-forced through PEFT's unmerged model: every token
    is PEFT's argmax, or within PEFT_ATOL of it (a near-tie, where float rounding decides)."""
    qwen = qwen_ref.load(tiny("qwen2.5"), lora_dir=adapters)
    body = {"prompt": "Tell me all about PEP-8", "max_tokens": 12, "temperature": 0, "lora": name}
    p = prepare(qwen, body)
    out = Response(qwen.tokenizer, p)
    engine = Engine(qwen.model)
    engine.add(p.engine_request(qwen), out.push)
    while engine.has_work():
        engine.step()
    oracle = peft.PeftModel.from_pretrained(hf_base(tiny("qwen2.5")), adapters / name).eval()
    with torch.no_grad():
        logits = oracle(torch.tensor([p.prompt_ids + out.tokens])).logits[0, len(p.prompt_ids) - 1 : -1]
    for step, token in enumerate(out.tokens):
        row = logits[step]
        assert row[token] >= row.max() - PEFT_ATOL, (step, token, int(row.argmax()))


def test_a_lora_request_that_hangs_up_frees_its_row_at_the_next_step(tiny, adapters):
    qwen = qwen_ref.load(tiny("qwen2.5"), lora_dir=adapters)
    keep = prepare(qwen, {"prompt": "plain", "max_tokens": 30, "seed": 1})
    gone = prepare(qwen, {"prompt": "long answer", "max_tokens": 1200, "seed": 2, "lora": "alpha"})
    engine = Engine(qwen.model, prefill_chunk=256)  # both prompts prefilled in the first step
    events: list = []
    engine.add(keep.engine_request(qwen), lambda e: None)
    handle = engine.add(gone.engine_request(qwen), events.append)
    for _ in range(5):
        engine.step()
    reserved = engine.stats()["kv_reserved_bytes"]
    handle.cancel()
    engine.step()
    stats = engine.stats()
    assert stats["active"] == 1 and handle.cache is None and stats["kv_reserved_bytes"] < reserved
    produced = len(events)
    while engine.has_work():
        engine.step()
    assert len(events) == produced == 5  # nothing after the hang-up
