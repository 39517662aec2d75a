"""The request's sampling fields: one table of their types and ranges, and SamplingParams, which checks them."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, fields

from qwen_ref.errors import InvalidSamplingParams
from qwen_ref.sampling.rng import SEED_MAX, SEED_MIN


@dataclass(frozen=True)
class _Rule:
    kind: str  # "number" or "integer", as in the JSON schema
    low: int
    high: int | None

    def describe(self) -> str:
        return f"{self.kind} {self.low}..{self.high}" if self.high is not None else f"{self.kind} >= {self.low}"

    @property
    def noun(self) -> str:
        return "an integer" if self.kind == "integer" else "a number"


_RULES: dict[str, _Rule] = {
    "temperature": _Rule("number", 0, 5),
    "top_p": _Rule("number", 0, 2),
    "top_k": _Rule("integer", 1, 50),
    "seed": _Rule("integer", SEED_MIN, SEED_MAX),
    "repetition_penalty": _Rule("number", 0, 2),
    "frequency_penalty": _Rule("number", 0, 2),
    "presence_penalty": _Rule("number", 0, 2),
    "max_tokens": _Rule("integer", 1, None),
}
_REQUIRED = ("temperature", "max_tokens")  # the fields with a default instead of "absent"
SAMPLING_FIELDS = tuple(_RULES)  # the request fields SamplingParams takes, in the schema's order


def _validated(name: str, value: object) -> int | float:
    rule = _RULES[name]
    allowed = rule.describe()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidSamplingParams(f"{name}: {value!r} is not {rule.noun}; allowed: {allowed}")
    number: int | float = int(value) if isinstance(value, numbers.Integral) else float(value)
    if isinstance(number, float):
        if not math.isfinite(number):
            raise InvalidSamplingParams(f"{name}: {value!r} is not a finite number; allowed: {allowed}")
        if rule.kind == "integer":
            # JSON Schema's "integer" is any number with a zero fractional part, so 2.0 is the integer 2
            if not number.is_integer():
                raise InvalidSamplingParams(f"{name}: {value!r} is not an integer; allowed: {allowed}")
            number = int(number)
    if number < rule.low or (rule.high is not None and number > rule.high):
        raise InvalidSamplingParams(f"{name}: {value!r} is out of range; allowed: {allowed}")
    return float(number) if rule.kind == "number" else number


@dataclass(frozen=True)
class SamplingParams:
    """The request's sampling fields; None means absent (neutral). Values are validated and normalised:
    number fields become float, integer fields int (2.0 is accepted as 2)."""

    temperature: float = 0.6
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    max_tokens: int = 256

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None or f.name in _REQUIRED:
                object.__setattr__(self, f.name, _validated(f.name, value))

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> SamplingParams:
        """From the schema's field names. Every key must be a sampling field; a None value means absent."""
        if not isinstance(d, Mapping):
            raise InvalidSamplingParams(f"sampling parameters: {d!r} is not a mapping of field names to values")
        for key in d:
            if key not in _RULES:
                raise InvalidSamplingParams(
                    f"{key!r} is not a sampling field; allowed: {', '.join(_RULES)}")
        return cls(**{k: v for k, v in d.items() if v is not None})  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, int | float]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @property
    def greedy(self) -> bool:
        """temperature 0: the token is the argmax, the seed is not used."""
        return self.temperature == 0.0


def as_params(params: SamplingParams | Mapping[str, object]) -> SamplingParams:
    """What every entry point accepts: SamplingParams, or a mapping with the schema's field names."""
    return params if isinstance(params, SamplingParams) else SamplingParams.from_dict(params)
