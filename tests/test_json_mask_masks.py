"""JSON mode (qwen_ref.sampling.json_mask): the llguidance token mask of one constraint, token by token."""

from __future__ import annotations

import json

import pytest
import torch
from json_mask_helpers import (
    CODER_V,
    ENUMS,
    EOS,
    PERSON,
    VALID_TEXTS,
    V,
    allowed_ids,
    constraint,
    feed,
    qwen_fixture,  # noqa: F401 (the fixture `qwen`)
    schema_format,
    tok_fixture,  # noqa: F401 (the fixture `tok`)
)

from qwen_ref.sampling.json_mask import JsonConstraint, JsonConstraintError, JsonModeNotMet, batch_allowed

pytest.importorskip("llguidance")

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
