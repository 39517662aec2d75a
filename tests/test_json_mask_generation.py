"""JSON mode in generation: seeded generations on the tiny random-weight model that must parse and validate,
and the examples of docs/json_mode.md."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest
import torch
from json_mask_helpers import (
    ENUMS,
    NESTED,
    NUMBERS,
    PERSON,
    qwen_fixture,  # noqa: F401 (the fixture `qwen`)
    schema_format,
)

from qwen_ref.engine import Engine, EngineRequest, Failed, Token
from qwen_ref.sampling import RequestState
from qwen_ref.sampling.json_mask import JsonConstraint, JsonModeNotMet

pytest.importorskip("llguidance")

Prior = Callable[[int], torch.Tensor]  # engine step -> a bias added to the logits (tests only)

# ----------------------------------------------------------------------------------------------------------
# Generation on the tiny random-weight model


def generate_json(qwen, response_format, seeds, max_tokens, prior: Prior | None = None, params=None):
    """Seeded JSON-mode generations, each seed its own request in one engine, sampled by qwen_ref.sampling with
    the JSON mask as stage 0; per row the constraint, the output text (no eos) and the output tokens. `prior`
    (tests only) is added to the model's logits at every engine step."""
    tok = qwen.tokenizer
    prompt = tok.encode("<|im_start|>user\nAnswer in JSON.<|im_end|>\n<|im_start|>assistant\n")
    engine = Engine(qwen.model)
    constraints, outputs, failures = [], [], []

    def sink(out: list[int]):
        def take(event) -> None:
            if isinstance(event, Token):
                out.append(event.token)
            elif isinstance(event, Failed):
                failures.append(event.error)
        return take

    for seed in seeds:
        c = JsonConstraint.from_response_format(response_format, tok, qwen.config.vocab_size,
                                                eos_ids=qwen.eos_token_ids)
        state = RequestState.start({"temperature": 1.0, **(params or {}), "seed": seed}, prompt)
        constraints.append(c)
        outputs.append([])
        engine.add(EngineRequest(list(prompt), max_tokens, state, frozenset(qwen.eos_token_ids), constraint=c),
                   sink(outputs[-1]))
    step = [0]
    end = qwen.model.end  # every forward, and a prefill chunk's last slice, ends here with the logits

    def end_with_prior(*args, **kwargs):
        logits = end(*args, **kwargs)
        return None if logits is None else logits + prior(step[0])

    if prior is not None:
        qwen.model.end = end_with_prior
    try:
        while engine.has_work():
            engine.step()
            step[0] += 1
    finally:
        if prior is not None:
            del qwen.model.end
    assert not failures, failures
    texts = [tok.decode([t for t in out if t not in qwen.eos_token_ids]) for out in outputs]
    return list(zip(constraints, texts, outputs))


SEEDS = range(1, 21)


@pytest.mark.slow
@pytest.mark.parametrize("schema", [PERSON, NESTED, ENUMS, NUMBERS], ids=["person", "nested", "enums", "numbers"])
def test_seeded_generations_parse_and_validate(qwen, schema):
    results = generate_json(qwen, schema_format(schema), SEEDS, max_tokens=200)
    completed = 0
    for c, text, out in results:
        if c.is_complete():
            completed += 1
            assert out[-1] in qwen.eos_token_ids, "a complete value ends at an eos id"
            jsonschema.validate(c.result(text), schema)
        else:
            assert len(out) == 200
            with pytest.raises(JsonModeNotMet):
                c.result(text)
    assert completed >= 16, f"only {completed} of 20 finished within 200 tokens"


@pytest.mark.slow
def test_json_object_generations_parse_to_objects(qwen):
    # A random model almost never closes an unbounded string (a quote is a few hundred of ~147k allowed
    # tokens), so this run adds a prior to the logits: tokens containing '"' from the start, and after a few
    # steps also tokens containing '}'. The mask alone decides what is allowed: the output is still an object.
    tok = qwen.tokenizer
    token_bytes = [tok.token_bytes(i) for i in range(tok.vocab_size)]
    quote, brace = torch.zeros(qwen.config.vocab_size), torch.zeros(qwen.config.vocab_size)
    quote[[i for i, t in enumerate(token_bytes) if b'"' in t]] = 6.0
    brace[[i for i, t in enumerate(token_bytes) if b"}" in t]] = 6.0
    results = generate_json(qwen, {"type": "json_object"}, SEEDS, max_tokens=120,
                            prior=lambda step: quote + brace if step >= 6 else quote)
    completed = [c.result(text) for c, text, _ in results if c.is_complete()]
    assert all(isinstance(value, dict) for value in completed)
    assert len(completed) >= 10 and sum(len(value) > 1 for value in completed) >= 5, completed


def test_max_tokens_running_out_is_json_mode_not_met(qwen):
    results = generate_json(qwen, schema_format(NESTED), [1, 2], max_tokens=4)
    for c, text, out in results:
        assert len(out) == 4 and not c.is_complete()
        with pytest.raises(JsonModeNotMet) as info:
            c.result(text)
        assert str(info.value) == "JSON Mode couldn't be met" and "max_tokens" in info.value.detail


def test_the_mask_works_with_the_sampler(qwen):
    [(c, text, out)] = generate_json(qwen, schema_format(ENUMS), [7], 120, params={"top_k": 5})
    assert out[-1] in qwen.eos_token_ids
    jsonschema.validate(c.result(text), ENUMS)


def test_the_python_examples_of_the_docs_run():
    doc = Path(__file__).resolve().parents[1] / "docs" / "json_mode.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, str(doc), "exec"), {})
