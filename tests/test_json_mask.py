"""JSON mode (qwen_ref.sampling.json_mask): the llguidance token mask, a batch whose rows fail alone, schema
errors, seeded generations on the tiny random-weight model that must parse and validate, and the examples of
docs/json_mode.md."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest
import torch

import qwen_ref
from qwen_ref.engine import Engine, EngineRequest, Failed, Token
from qwen_ref.errors import QwenRefError
from qwen_ref.sampling import RequestState
from qwen_ref.sampling.json_mask import (
    JSON_MODE_NOT_MET,
    InvalidJsonSchema,
    JsonConstraint,
    JsonConstraintError,
    JsonModeNotMet,
    JsonModeUnavailable,
    batch_allowed,
    json_schema_of,
)

pytest.importorskip("llguidance")

V = 151936  # the tiny Qwen2.5 model's logits rows; its tokenizer knows 151665 ids
CODER_V = 152064
Prior = Callable[[int], torch.Tensor]  # engine step -> a bias added to the logits (tests only)
EOS = (151645, 151643)  # <|im_end|>, <|endoftext|>

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "admin": {"type": "boolean"},
    },
    "required": ["name", "age", "admin"],
    "additionalProperties": False,
}
NESTED = {
    "type": "object",
    "properties": {
        "user": {
            "type": "object",
            "properties": {
                "id": {"type": "integer", "minimum": 0, "maximum": 9999},
                "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
                "address": {
                    "type": "object",
                    "properties": {"city": {"type": "string", "maxLength": 8},
                                   "zip": {"type": "integer", "minimum": 10000, "maximum": 99999}},
                    "required": ["city"],
                    "additionalProperties": False,
                },
            },
            "required": ["id", "tags", "address"],
            "additionalProperties": False,
        },
        "score": {"type": "number", "minimum": 0, "maximum": 10},
    },
    "required": ["user", "score"],
    "additionalProperties": False,
}
ENUMS = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "sizes": {"type": "array", "items": {"enum": ["S", "M", "L"]}, "minItems": 1, "maxItems": 4},
        "note": {"type": ["string", "null"], "maxLength": 8},
        "version": {"const": 2},
    },
    "required": ["color", "sizes", "version"],
    "additionalProperties": False,
}
NUMBERS = {
    "type": "object",
    "properties": {
        "values": {"type": "array", "items": {"type": "number"}, "maxItems": 4},
        "flags": {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 2},
        "count": {"type": "integer", "minimum": -5, "maximum": 5},
        "ratio": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["values", "flags", "count"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def qwen(tiny):
    return qwen_ref.load(tiny("qwen2.5"))


@pytest.fixture(scope="module")
def tok(qwen):
    return qwen.tokenizer


def constraint(tok, response_format, vocab_size=V, **kw) -> JsonConstraint:
    return JsonConstraint.from_response_format(response_format, tok, vocab_size, eos_ids=EOS, **kw)


def schema_format(schema) -> dict:
    return {"type": "json_schema", "json_schema": schema}


def allowed_ids(c: JsonConstraint) -> list[int]:
    return c.allowed_mask().nonzero().flatten().tolist()


def feed(c: JsonConstraint, tok, text: str) -> None:
    """Advance through the tokens of `text`, checking each was allowed by the mask before it."""
    for t in tok.encode(text):
        mask = c.allowed_mask()
        assert mask[t], f"{tok.decode([t])!r} should be allowed after the text before it in {text!r}"
        c.advance(t)


# ----------------------------------------------------------------------------------------------------------
# The mask


def test_json_object_starts_with_an_object_and_nothing_else(tok):
    c = constraint(tok, {"type": "json_object"})
    starts = [tok.decode([i]) for i in allowed_ids(c)]
    assert starts and all(s.startswith("{") for s in starts), starts
    mask = c.allowed_mask()
    for text in ("Hello", " {", "[", '"', "1", "\n", "```"):
        assert not mask[tok.encode(text)[0]], text
    assert not mask[list(EOS)].any(), "nothing is complete yet, so no eos"
    assert not mask[sorted(tok.special_ids)].any()


@pytest.mark.parametrize(("schema", "first"), [
    ({"type": "array"}, "["),
    ({"type": "string"}, '"'),
    ({"type": "boolean"}, "tf"),
    ({"enum": ["yes", "no"]}, '"'),
    ({"type": "integer"}, "-0123456789"),
])
def test_the_first_token_starts_a_value_of_the_schema(tok, schema, first):
    starts = [tok.decode([i]) for i in allowed_ids(constraint(tok, schema_format(schema)))]
    assert starts and all(s[0] in first for s in starts), starts


@pytest.mark.parametrize("vocab_size", [V, CODER_V])
def test_rows_past_the_tokenizer_are_always_masked(tok, vocab_size):
    c = constraint(tok, schema_format({"type": "object", "properties": {"s": {"type": "string"}}}), vocab_size)
    for t in [*tok.encode('{"s": "text with spaces'), *tok.encode('"}'), EOS[0]]:
        mask = c.allowed_mask()
        assert mask.shape == (vocab_size,) and mask.dtype == torch.bool
        assert not mask[tok.vocab_size:].any()
        assert mask[t]
        c.advance(t)
    inside_string = constraint(tok, schema_format({"type": "string"}), vocab_size)
    inside_string.advance(tok.encode('"')[0])
    mask = inside_string.allowed_mask()
    assert mask.sum() > 100_000  # nearly the whole vocabulary may continue a string...
    assert not mask[tok.vocab_size:].any()  # ...but never the padding rows
    batch, failed = batch_allowed([inside_string, None], vocab_size)
    assert not failed and not batch[0, tok.vocab_size:].any() and batch[1].all()


VALID_TEXTS = [
    '{"name": "Ada", "age": 36, "admin": true}',
    '{"name":"Ada","age":36,"admin":false}',
    json.dumps({"name": "Zoë 李", "age": 0, "admin": True}, indent=2, ensure_ascii=False),
    json.dumps({"name": "tab\tquote\"", "age": 120, "admin": False}),
    '{ "name" : "\\u00e9" , "age" : 7 , "admin" : true }',
]


@pytest.mark.parametrize("text", VALID_TEXTS)
def test_a_valid_json_token_sequence_stays_allowed_and_ends_complete(tok, text):
    c = constraint(tok, schema_format(PERSON))
    feed(c, tok, text[:-1])
    assert not c.is_complete() and not c.is_finished()
    with pytest.raises(JsonModeNotMet):
        c.require_complete()
    feed(c, tok, text[-1])
    assert c.is_complete() and c.is_finished()
    assert allowed_ids(c) == sorted(EOS), "a complete value allows the eos ids and nothing else"
    c.advance(EOS[1])
    assert c.is_finished() and allowed_ids(c) == sorted(EOS)
    assert c.result(text) == json.loads(text)
    with pytest.raises(JsonConstraintError, match="after the eos"):
        c.advance(tok.encode(" ")[0])


def test_the_mask_follows_the_schema(tok):
    c = constraint(tok, schema_format(ENUMS))
    feed(c, tok, '{"color": "')
    continuations = {tok.decode([i]) for i in allowed_ids(c)}
    assert continuations and all(any(w.startswith(s) for w in ("red", "green", "blue")) for s in continuations)
    feed(c, tok, 'green", "sizes": [')
    assert tok.encode("]")[0] not in allowed_ids(c), "minItems 1: the array cannot close empty"
    feed(c, tok, '"S", "M", "L", "S"')
    assert tok.encode(",")[0] not in allowed_ids(c), "maxItems 4: no fifth item"
    feed(c, tok, '], "version": 2}')
    assert c.is_complete()


def test_a_forbidden_token_is_refused(tok):
    c = constraint(tok, {"type": "json_object"})
    with pytest.raises(JsonConstraintError, match="not allowed"):
        c.advance(tok.encode("Hello")[0])


def test_json_object_allows_any_object_but_only_an_object(tok):
    text = '{"a": [1, 2.5e-3, null, {"b": {}}], "c": "\\n", "d": false}'
    c = constraint(tok, {"type": "json_object"})
    feed(c, tok, text)
    assert c.is_complete() and c.result(text) == json.loads(text)


@pytest.mark.parametrize(("whitespace", "text", "ok"), [
    ("bounded", '{"a":[1,2]}', True),
    ("bounded", '{"a": [1, 2]}', True),
    ("bounded", '{\n  "a": [\n    1,\n    2\n  ]\n}', True),
    ("bounded", '{\n\n  "a": [1, 2]}', False),  # no blank lines
    ("bounded", '{"a":  [1, 2]}', False),  # no runs of spaces outside indentation
    ("compact", '{"a":[1,2]}', True),
    ("compact", '{"a": [1,2]}', False),
    ("flexible", '{\n\n\n  "a":   [1,\t2]  }', True),
])
def test_whitespace_modes(tok, whitespace, text, ok):
    c = constraint(tok, {"type": "json_object"}, whitespace=whitespace)
    if ok:
        feed(c, tok, text)
        assert c.is_complete()
    else:
        with pytest.raises((AssertionError, JsonConstraintError)):
            feed(c, tok, text)


def test_the_default_eos_is_the_tokenizers(tok):
    c = JsonConstraint.from_response_format(schema_format({"type": "boolean"}), tok, V)
    assert c.eos_ids == (tok.eos_token_id,)
    feed(c, tok, "true")
    assert allowed_ids(c) == [tok.eos_token_id]


def test_a_vocab_smaller_than_the_tokenizer_is_refused(tok):
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        constraint(tok, {"type": "json_object"}, vocab_size=1000)


def test_batch_allowed(tok):
    a = constraint(tok, {"type": "json_object"})
    b = constraint(tok, schema_format({"type": "array"}))
    done = constraint(tok, schema_format({"type": "null"}))
    feed(done, tok, "null")
    assert batch_allowed([None, None], V) == (None, {})
    mask, failed = batch_allowed([a, None, b, done], V)
    assert failed == {}
    assert mask.shape == (4, V)
    assert torch.equal(mask[0], a.allowed_mask()) and torch.equal(mask[2], b.allowed_mask())
    assert mask[1].all()
    assert mask[3].nonzero().flatten().tolist() == sorted(EOS)


def three_rows(tok) -> list[JsonConstraint]:
    rows = [constraint(tok, {"type": "json_object"}), constraint(tok, schema_format(ENUMS)),
            constraint(tok, schema_format({"type": "array"}))]
    feed(rows[1], tok, '{"color": "')
    return rows


@pytest.mark.parametrize("broken", [0, 1, 2])
def test_a_matcher_in_an_error_state_fails_its_row_alone(tok, broken):
    alone = [c.allowed_mask() for c in three_rows(tok)]
    rows = three_rows(tok)
    with pytest.raises(JsonConstraintError, match="not allowed"):
        rows[broken].advance(tok.encode("Hello")[0])  # refused: llguidance's matcher is now in its error state
    mask, failed = batch_allowed(rows, V)
    assert list(failed) == [broken]
    assert isinstance(failed[broken], JsonConstraintError) and "error state" in str(failed[broken])
    assert mask[broken].all(), "a failed row allows every token, so the batch can still be sampled"
    for row in set(range(3)) - {broken}:
        assert torch.equal(mask[row], alone[row])
    with pytest.raises(JsonConstraintError, match="error state"):
        rows[broken].allowed_mask()


class _RaisingMatcher:
    """Stands in for an llguidance matcher that fails while computing its mask."""

    def is_error(self) -> bool:
        return False

    def is_stopped(self) -> bool:
        return False

    def unsafe_compute_mask_ptr(self, pointer: int, size: int) -> None:
        raise RuntimeError("boom")


def test_any_exception_of_one_row_is_caught_for_that_row(tok, monkeypatch):
    alone = [c.allowed_mask() for c in three_rows(tok)]
    rows = three_rows(tok)
    rows[1]._matcher = _RaisingMatcher()  # fails the parallel call: each row is then computed alone
    mask, failed = batch_allowed(rows, V)
    assert list(failed) == [1] and isinstance(failed[1], JsonConstraintError)
    assert str(failed[1]) == "the JSON mask could not be computed: RuntimeError: boom"
    assert isinstance(failed[1].__cause__, RuntimeError)
    assert mask[1].all() and torch.equal(mask[0], alone[0]) and torch.equal(mask[2], alone[2])

    rows = three_rows(tok)
    monkeypatch.setattr(rows[2], "is_finished", lambda: 1 / 0)
    mask, failed = batch_allowed([rows[0], None, rows[2], rows[1]], V)
    assert list(failed) == [2] and "ZeroDivisionError" in str(failed[2])
    assert torch.equal(mask[0], alone[0]) and torch.equal(mask[3], alone[1]) and mask[1].all() and mask[2].all()

    wider = constraint(tok, {"type": "json_object"}, vocab_size=CODER_V)
    mask, failed = batch_allowed([wider, three_rows(tok)[0]], V)
    assert list(failed) == [0] and f"vocab_size {CODER_V}, not {V}" in str(failed[0])
    assert torch.equal(mask[1], alone[0])


# ----------------------------------------------------------------------------------------------------------
# response_format and schema errors


def test_the_schema_is_taken_directly_or_from_openais_wrapper(tok):
    direct = schema_format(PERSON)
    wrapped = schema_format({"name": "person", "strict": True, "schema": PERSON})
    assert json_schema_of(direct) == (PERSON, "/response_format/json_schema")
    assert json_schema_of(wrapped) == (PERSON, "/response_format/json_schema/schema")
    assert json_schema_of({"type": "json_object"})[0] == {"type": "object"}
    for rf in (direct, wrapped):
        c = constraint(tok, rf)
        feed(c, tok, VALID_TEXTS[0])
        assert c.is_complete()
    # a schema that only looks like a wrapper because it has other keys is a schema
    odd = {"type": "object", "schema": {"type": "string"}}
    assert json_schema_of(schema_format(odd))[0] == odd


BAD_FORMATS = [
    ({"type": "json_schema"}, "/response_format/json_schema", "required key 'json_schema' is missing"),
    ({"type": "text"}, "/response_format/type", "expected 'json_object' or 'json_schema'"),
    ({"type": "json_object", "json_schema": PERSON}, "/response_format/json_schema", "only allowed with"),
    ("json", "/response_format", "expected an object"),
    (schema_format([1]), "/response_format/json_schema", "expected a JSON Schema"),
    (schema_format(False), "/response_format/json_schema", "allows no value"),
    (schema_format({"type": "foo"}), "/response_format/json_schema/type", "not a valid JSON Schema"),
    (schema_format({"type": "object", "properties": {"a": {"minLength": "x"}}}),
     "/response_format/json_schema/properties/a/minLength", "not a valid JSON Schema"),
    (schema_format({"type": "object", "required": "a"}), "/response_format/json_schema/required",
     "not a valid JSON Schema"),
    (schema_format({"$schema": 7}), "/response_format/json_schema/$schema", "expected a string URI"),
    (schema_format({"name": "x", "schema": {"type": "foo"}}), "/response_format/json_schema/schema/type",
     "not a valid JSON Schema"),
    (schema_format({"name": "x", "strict": "yes", "schema": {}}), "/response_format/json_schema/strict",
     "expected a boolean"),
    (schema_format({"not": {"type": "string"}}), "/response_format/json_schema", 'Unimplemented keys: ["not"]'),
    (schema_format({"type": "array", "uniqueItems": True}), "/response_format/json_schema", "uniqueItems"),
    (schema_format({"type": "string", "minLength": 5, "maxLength": 2}), "/response_format/json_schema",
     "minLength (5) is greater than maxLength (2)"),
    (schema_format({"$ref": "#/$defs/missing"}), "/response_format/json_schema", "does not exist"),
    (schema_format({"allOf": [{"type": "string"}, {"type": "integer"}]}), "/response_format/json_schema",
     "Unsatisfiable"),
]


@pytest.mark.parametrize(("response_format", "path", "detail"), BAD_FORMATS)
def test_a_bad_response_format_raises_invalid_json_schema(tok, response_format, path, detail):
    with pytest.raises(InvalidJsonSchema) as info:
        constraint(tok, response_format)
    error = info.value
    assert isinstance(error, ValueError) and isinstance(error, QwenRefError)
    assert error.path == path and detail in error.detail, str(error)
    assert str(error).startswith(f"{path}: ")


def test_llguidance_options_in_the_schema_are_ignored(tok):
    # "lenient" would make llguidance skip "not" instead of refusing a schema it cannot enforce
    with pytest.raises(InvalidJsonSchema, match="Unimplemented keys"):
        constraint(tok, schema_format({"x-guidance": {"lenient": True}, "not": {"type": "string"}}))
    c = constraint(tok, schema_format({"x-guidance": {"whitespace_flexible": True}, "type": "array"}))
    c.advance(tok.encode("[")[0])
    with pytest.raises(JsonConstraintError):  # a blank line: not in the bounded whitespace rule
        c.advance(tok.encode("\n\n")[0])


def test_a_true_schema_allows_any_value(tok):
    c = constraint(tok, schema_format(True))
    feed(c, tok, "[1, {}]")
    assert c.is_complete()


def test_without_llguidance_json_mode_says_how_to_install_it(tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # makes `import llguidance` fail
    with pytest.raises(JsonModeUnavailable, match=r"pip install 'qwen-ref\[json\]'") as info:
        constraint(tok, {"type": "json_object"})
    assert isinstance(info.value, ImportError) and isinstance(info.value, QwenRefError)


def test_json_mode_not_met_has_the_services_message():
    error = JsonModeNotMet("max_tokens ran out")
    assert str(error) == JSON_MODE_NOT_MET == "JSON Mode couldn't be met"
    assert isinstance(error, QwenRefError) and error.detail == "max_tokens ran out"


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
    hook = None if prior is None else qwen.model.register_forward_hook(
        lambda module, args, logits: None if logits is None else logits + prior(step[0]))
    try:
        while engine.has_work():
            engine.step()
            step[0] += 1
    finally:
        if hook is not None:
            hook.remove()
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
