"""The sampling parameters: the one table of field rules, its error messages and normalisation."""

from __future__ import annotations

import re

import numpy as np
import pytest

from qwen_ref.errors import InvalidSamplingParams
from qwen_ref.sampling import SAMPLING_FIELDS, SEED_MAX, SEED_MIN, SamplingParams


@pytest.mark.parametrize(("field", "value", "message"), [
    ("temperature", -0.1, "out of range; allowed: number 0..5"),
    ("temperature", 5.01, "out of range"),
    ("temperature", float("nan"), "not a finite number"),
    ("temperature", float("inf"), "not a finite number"),
    ("temperature", "0.5", "not a number"),
    ("temperature", True, "not a number"),
    ("temperature", None, "not a number"),
    ("top_p", 2.5, "out of range; allowed: number 0..2"),
    ("top_p", -1e-9, "out of range"),
    ("top_p", [0.5], "not a number"),
    ("top_k", 0, "out of range; allowed: integer 1..50"),
    ("top_k", 51, "out of range"),
    ("top_k", 2.5, "not an integer"),
    ("top_k", False, "not an integer"),
    ("top_k", float("inf"), "not a finite number"),
    ("seed", 0, "out of range; allowed: integer 1..9999999999"),
    ("seed", 10_000_000_000, "out of range"),
    ("seed", "42", "not an integer"),
    ("repetition_penalty", 2.0000001, "out of range; allowed: number 0..2"),
    ("repetition_penalty", float("-inf"), "not a finite number"),
    ("frequency_penalty", -0.5, "out of range"),
    ("presence_penalty", 3, "out of range"),
    ("presence_penalty", float("nan"), "not a finite number"),
    ("max_tokens", 0, "out of range; allowed: integer >= 1"),
    ("max_tokens", 1.5, "not an integer"),
])
def test_bad_params_name_the_field_value_and_range(field: str, value: object, message: str) -> None:
    with pytest.raises(InvalidSamplingParams, match=re.escape(message)) as err:
        SamplingParams(**{field: value})  # type: ignore[arg-type]
    assert str(err.value).startswith(f"{field}: {value!r} ")
    if value is not None:  # from_dict treats None as absent
        with pytest.raises(InvalidSamplingParams, match=re.escape(field)):
            SamplingParams.from_dict({field: value})


def test_params_defaults_and_normalisation() -> None:
    sp = SamplingParams.from_dict({"top_k": 2.0, "seed": 7.0, "top_p": 1, "repetition_penalty": 0})
    assert (sp.top_k, sp.seed, sp.top_p, sp.repetition_penalty) == (2, 7, 1.0, 0.0)
    assert type(sp.top_k) is int and type(sp.top_p) is float
    assert (sp.temperature, sp.max_tokens, sp.frequency_penalty) == (0.6, 256, None)
    assert SamplingParams.from_dict({"temperature": None}).temperature == 0.6
    assert SamplingParams(top_k=np.int64(3)).top_k == 3
    with pytest.raises(InvalidSamplingParams, match="'prompt' is not a sampling field"):
        SamplingParams.from_dict({"prompt": "hi"})
    with pytest.raises(InvalidSamplingParams, match="not a mapping"):
        SamplingParams.from_dict([("top_k", 1)])  # type: ignore[arg-type]


def test_the_seed_rule_is_the_generators_range() -> None:
    assert (SEED_MIN, SEED_MAX) == (1, 9_999_999_999)
    assert SamplingParams(seed=SEED_MIN).seed == SEED_MIN and SamplingParams(seed=SEED_MAX).seed == SEED_MAX
    for bad in (SEED_MIN - 1, SEED_MAX + 1):
        with pytest.raises(InvalidSamplingParams, match=f"allowed: integer {SEED_MIN}..{SEED_MAX}"):
            SamplingParams(seed=bad)


def test_sampling_fields_are_the_params_fields_in_schema_order() -> None:
    assert SAMPLING_FIELDS == ("temperature", "top_p", "top_k", "seed", "repetition_penalty", "frequency_penalty",
                               "presence_penalty", "max_tokens")
    assert tuple(SamplingParams.from_dict({}).to_dict()) == ("temperature", "max_tokens")
    full = dict(zip(SAMPLING_FIELDS, (0.5, 0.9, 3, 7, 1.1, 0.2, 0.3, 9)))
    assert SamplingParams.from_dict(full).to_dict() == full
