"""JSON mode: a token mask from llguidance that keeps a request's output a JSON value matching its schema.

Stage 0 of the sampler (docs/sampling.md): before penalties, temperature, top-k and top-p, every token the
grammar does not allow gets -inf. The mask allows a token when its bytes extend the text so far towards a
complete JSON value; once the value is complete it allows only the eos ids, so generation ends there.
docs/json_mode.md describes what is accepted and the limits.

llguidance is an optional dependency (`pip install 'qwen-ref[json]'`); it is imported on first use, so this
module and its error types import without it.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from qwen_ref.errors import QwenRefError

if TYPE_CHECKING:
    import llguidance

    from qwen_ref.tokenizer.runtime import QwenTokenizer

JSON_MODE_NOT_MET = "JSON Mode couldn't be met"  # the service's message, word for word

Whitespace = Literal["bounded", "compact", "flexible"]
# What may stand between two JSON tokens (llguidance never allows whitespace before or after the value):
# - bounded: nothing, one space, or a newline and up to 20 spaces/tabs (llama.cpp's json.gbnf rule). Compact,
#   json.dumps-style and indented JSON all fit, but a run of blank lines does not, so a model cannot stall
#   on whitespace until max_tokens.
# - compact: nothing: {"a":1,"b":[2,3]}.
# - flexible: any JSON whitespace, any amount (llguidance's default; runaway whitespace is possible).
_WHITESPACE: dict[str, dict[str, Any]] = {
    "bounded": {"whitespace_pattern": r"(?: |\n[ \t]{0,20})"},
    "compact": {"whitespace_flexible": False},
    "flexible": {"whitespace_flexible": True},
}
# \u00e9-style escapes in strings, as json.dumps writes non-ASCII text by default (llguidance's default only allows
# them for control characters). Strings with a pattern, format or enum still take their characters literally.
_ESCAPES = {"json_allow_general_unicode_escapes": True}
# OpenAI's response_format.json_schema is {"name", "schema", "strict", "description"}; Workers AI's is the schema
_WRAPPER_KEYS = frozenset({"name", "description", "schema", "strict"})
_ROOT = "/response_format/json_schema"


class JsonModeUnavailable(QwenRefError, ImportError):
    """llguidance, which JSON mode needs, is not installed."""


class InvalidJsonSchema(QwenRefError, ValueError):
    """response_format is malformed, or its schema is invalid or uses what JSON mode cannot enforce.
    `.path` is the JSON pointer of the problem inside the request, `.detail` the problem."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.path = path
        self.detail = detail

    def __reduce__(self) -> tuple[type[InvalidJsonSchema], tuple[str, str]]:
        return type(self), (self.path, self.detail)


class JsonModeNotMet(QwenRefError):
    """The output is not a complete JSON value matching the schema (max_tokens ran out first). The message is
    the service's, word for word; `.detail` says what happened."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(JSON_MODE_NOT_MET)
        self.detail = detail

    def __reduce__(self) -> tuple[type[JsonModeNotMet], tuple[str]]:
        return type(self), (self.detail,)


class JsonConstraintError(QwenRefError, RuntimeError):
    """A token the mask forbids was fed to advance(), or llguidance failed: a bug, not the caller's fault."""


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError as e:
        raise JsonModeUnavailable(
            f"JSON mode (response_format) needs llguidance, which is not installed ({e}); "
            "install it with: pip install 'qwen-ref[json]'"
        ) from e
    return llguidance


# ----------------------------------------------------------------------------------------------------------
# The request's schema


def json_schema_of(response_format: Any) -> tuple[dict[str, Any] | bool, str]:
    """The JSON Schema a response_format asks for, and its JSON pointer in the request.

    {"type": "json_object"} is any JSON object. {"type": "json_schema", "json_schema": S} takes S as the schema
    (Workers AI's form), unless S is OpenAI's wrapper: an object with a "schema" key and no keys other than
    name, description, schema and strict; then its "schema" is used ("strict" is accepted and ignored: JSON
    mode always enforces the schema)."""
    if not isinstance(response_format, dict):
        raise InvalidJsonSchema("/response_format", f"expected an object, got {_show(response_format)}")
    kind = response_format.get("type")
    if kind == "json_object":
        if "json_schema" in response_format:
            raise InvalidJsonSchema(_ROOT, "only allowed with type 'json_schema', not with 'json_object'")
        return {"type": "object"}, "/response_format/type"
    if kind != "json_schema":
        raise InvalidJsonSchema("/response_format/type", f"expected 'json_object' or 'json_schema', got {_show(kind)}")
    if "json_schema" not in response_format:
        raise InvalidJsonSchema(_ROOT, "required key 'json_schema' is missing; type 'json_schema' needs it")
    schema = response_format["json_schema"]
    if isinstance(schema, dict) and "schema" in schema and set(schema) <= _WRAPPER_KEYS:
        _check_wrapper(schema)
        return schema["schema"], f"{_ROOT}/schema"
    return schema, _ROOT


def _check_wrapper(wrapper: dict[str, Any]) -> None:
    for key, kind in (("name", str), ("description", str), ("strict", bool)):
        if key in wrapper and not isinstance(wrapper[key], kind):
            raise InvalidJsonSchema(f"{_ROOT}/{key}", f"expected {'a boolean' if kind is bool else 'a string'}, "
                                                      f"got {_show(wrapper[key])}")


def _check_schema(schema: Any, path: str) -> None:
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError
    from jsonschema.validators import validator_for

    if not isinstance(schema, (dict, bool)):
        raise InvalidJsonSchema(path, f"expected a JSON Schema (an object or a boolean), got {_show(schema)}")
    if schema is False:
        raise InvalidJsonSchema(path, "the schema false allows no value, so no output can match it")
    if isinstance(schema, dict) and not isinstance(schema.get("$schema", ""), str):
        raise InvalidJsonSchema(f"{path}/$schema", f"expected a string URI, got {_show(schema['$schema'])}")
    try:
        validator_for(schema, default=Draft202012Validator).check_schema(schema)
    except SchemaError as e:
        where = "".join(f"/{str(p).replace('~', '~0').replace('/', '~1')}" for p in e.absolute_path)
        raise InvalidJsonSchema(path + where, f"not a valid JSON Schema: {e.message}") from None


def _grammar(schema: dict[str, Any] | bool, path: str, whitespace: Whitespace) -> str:
    llg = _llguidance()
    if whitespace not in _WHITESPACE:
        raise ValueError(f"whitespace {whitespace!r} is not one of {', '.join(_WHITESPACE)}")
    # llguidance reads options from a top-level "x-guidance" key; some (lenient, coerce_one_of) would let
    # through output the schema rejects, so it is dropped: the request's schema means what JSON Schema says
    plain = {} if schema is True else {k: v for k, v in schema.items() if k != "x-guidance"}
    try:
        return llg.LLMatcher.grammar_from_json_schema(plain, overrides={**_WHITESPACE[whitespace], **_ESCAPES})
    except ValueError as e:
        raise InvalidJsonSchema(path, f"JSON mode cannot use this schema: {e}") from None


def _show(value: Any, limit: int = 60) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ----------------------------------------------------------------------------------------------------------
# llguidance's view of our tokenizer


@dataclass(frozen=True)
class _Vocab:
    ll: Any  # llguidance.LLTokenizer
    size: int  # rows of the model's logits
    known: int  # the tokenizer's ids; rows from here to `size` are padding, always masked
    eos_ids: tuple[int, ...]


class _TokenTable:
    """What llguidance.TokenizerWrapper reads: each id's bytes, the special ids (which never match grammar
    text) and an encoder. Non-special added tokens such as Qwen2.5's <tool_call> are text, as in decode."""

    def __init__(self, tokenizer: QwenTokenizer, size: int, eos_id: int) -> None:
        known = tokenizer.vocab_size
        self.tokens = [tokenizer.token_bytes(i) for i in range(known)] + [b""] * (size - known)
        self.special_token_ids = sorted(tokenizer.special_ids)
        self.eos_token_id = eos_id
        self.bos_token_id = None
        self._encode = tokenizer.encode

    def __call__(self, text: str) -> list[int]:
        # TokenizerWrapper probes with bytes first; encode() refuses them, so it falls back to str
        return self._encode(text)


_VOCABS: weakref.WeakKeyDictionary[Any, dict[tuple[int, tuple[int, ...]], _Vocab]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _vocab(tokenizer: QwenTokenizer, vocab_size: int, eos_ids: Sequence[int] | None) -> _Vocab:
    """Built once per (tokenizer, vocab_size, eos ids) and cached while the tokenizer lives (about 2 s)."""
    llg = _llguidance()
    if eos_ids is None:
        eos_ids = () if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)
    eos = tuple(dict.fromkeys(int(i) for i in eos_ids))
    if not eos:
        raise ValueError("JSON mode needs at least one eos id to end generation; the tokenizer names none")
    if vocab_size < tokenizer.vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} ids")
    if any(not 0 <= i < tokenizer.vocab_size for i in eos):
        raise ValueError(f"eos ids {list(eos)} must be tokenizer ids (0..{tokenizer.vocab_size - 1})")
    key = (vocab_size, eos)
    with _LOCK:
        cached = _VOCABS.setdefault(tokenizer, {})
        if key not in cached:
            table = llg.TokenizerWrapper(_TokenTable(tokenizer, vocab_size, eos[0]))
            ll = llg.LLTokenizer(table, n_vocab=vocab_size, eos_token=list(eos))
            cached[key] = _Vocab(ll, vocab_size, tokenizer.vocab_size, eos)
        return cached[key]


# ----------------------------------------------------------------------------------------------------------
# Masks


def _words(vocab_size: int, rows: int = 1) -> torch.Tensor:
    return torch.zeros(rows, (vocab_size + 31) // 32, dtype=torch.int32)  # llguidance's layout: bit 1 = allowed


def _unpack(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    # Token i is bit i % 32 of word i // 32; written as little-endian bytes, it is bit i % 8 of byte i // 8.
    as_bytes = words.numpy().astype("<i4", copy=False).view(np.uint8)
    bits = np.unpackbits(as_bytes, axis=-1, bitorder="little")[:, :vocab_size]
    return torch.from_numpy(bits.view(np.bool_))


class JsonConstraint:
    """One request's JSON-mode state: its llguidance matcher, advanced by one token per decode step.

    Per step: `allowed_mask()` (stage 0 of the sampler), sample, `advance(token)`. At the end `result(text)`
    parses the output, or raises JsonModeNotMet when the JSON is not complete (max_tokens ran out)."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab: _Vocab, schema: dict[str, Any] | bool) -> None:
        self._matcher = matcher
        self._vocab = vocab
        self.schema = schema
        self.vocab_size = vocab.size
        self.eos_ids = vocab.eos_ids
        self._words = _words(vocab.size)
        self._ended = False  # an eos id was accepted

    @classmethod
    def from_response_format(
        cls,
        response_format: dict[str, Any],
        tokenizer: QwenTokenizer,
        vocab_size: int,
        *,
        eos_ids: Sequence[int] | None = None,
        whitespace: Whitespace = "bounded",
    ) -> JsonConstraint:
        """vocab_size is the model's logits width (151936 or 152064), eos_ids the ids that end generation
        (pass the checkpoint's, e.g. Qwen.eos_token_ids; default: the tokenizer's eos token)."""
        schema, path = json_schema_of(response_format)
        _check_schema(schema, path)
        grammar = _grammar(schema, path, whitespace)
        vocab = _vocab(tokenizer, vocab_size, eos_ids)
        llg = _llguidance()
        matcher = llg.LLMatcher(vocab.ll, grammar, log_level=0)  # compiles the grammar: about 1 ms
        if matcher.is_error():
            raise InvalidJsonSchema(path, f"JSON mode cannot enforce this schema: {matcher.get_error()}")
        return cls(matcher, vocab, schema)

    def allowed_mask(self) -> torch.Tensor:
        """A new bool tensor [vocab_size] on the CPU: True where the token may come next."""
        if self._fill_words(self._words, 0):
            return self._eos_only()
        return _unpack(self._words, self.vocab_size)[0]

    def fill_allowed(self, out: torch.Tensor) -> None:
        """Write allowed_mask() into a preallocated bool row `out` [vocab_size] (on any device)."""
        out.copy_(self.allowed_mask())

    def advance(self, token_id: int) -> None:
        """Feed the token the sampler chose; it must be one allowed_mask() allowed."""
        if self._ended:
            raise JsonConstraintError(f"token {token_id} after the eos that ended the JSON")
        if not self._matcher.consume_token(int(token_id)):
            raise JsonConstraintError(f"token {token_id} is not allowed by the JSON mask: {self._error()}")
        self._ended = int(token_id) in self.eos_ids

    def is_complete(self) -> bool:
        """The output so far is a complete JSON value matching the schema, so the eos ids are allowed now.
        For an object, array or string this also means nothing else is allowed; a number at the root may
        still grow (12 -> 123)."""
        return self._matcher.is_accepting()

    def is_finished(self) -> bool:
        """Only an eos id can come next (or one already came): the masks allow the eos ids and nothing else."""
        return self._ended or self._matcher.is_stopped()

    def require_complete(self) -> None:
        """Raise JsonModeNotMet unless the output is complete: call it when the token budget ran out."""
        if not self.is_complete():
            raise JsonModeNotMet("max_tokens ran out before the JSON value was complete")

    def result(self, text: str) -> Any:
        """The parsed JSON value of the output text (decoded without its eos token)."""
        self.require_complete()
        try:
            return json.loads(text)
        except ValueError as e:  # the grammar guarantees valid JSON; a text/token mismatch lands here
            raise JsonModeNotMet(f"the output is not valid JSON: {e}") from e

    def _fill_words(self, words: torch.Tensor, row: int) -> bool:
        """Fill row `row` of a packed mask; True if instead the row allows only the eos ids."""
        if self._ended or self._matcher.is_stopped():
            return True
        target = words[row]
        self._matcher.unsafe_compute_mask_ptr(target.data_ptr(), target.numel() * 4)
        self._check_words(target)
        return False

    def _check_words(self, words: torch.Tensor) -> None:
        if self._matcher.is_error():
            raise JsonConstraintError(f"llguidance failed to compute the mask: {self._error()}")
        if self._vocab.known < self.vocab_size:
            _clear_bits(words, self._vocab.known)

    def _eos_only(self) -> torch.Tensor:
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        mask[list(self.eos_ids)] = True
        return mask

    def _error(self) -> str:
        return self._matcher.get_error().split("\n", 1)[0]


def _clear_bits(words: torch.Tensor, start: int) -> None:
    # rows past the tokenizer are padding in the model's logits: never allowed, whatever llguidance says
    first = start // 32
    if start % 32:
        words[first] &= (1 << (start % 32)) - 1
        first += 1
    words[first:] = 0


def batch_allowed(constraints: Sequence[JsonConstraint | None], vocab_size: int) -> torch.Tensor | None:
    """Stage 0 for a batch: bool [B, vocab_size] on the CPU, or None when no row is in JSON mode. Rows
    without a constraint allow every token. The constrained rows' masks are computed in parallel."""
    if all(c is None for c in constraints):
        return None
    words = _words(vocab_size, len(constraints))
    jobs, eos_rows, free_rows = [], [], []
    for row, c in enumerate(constraints):
        if c is None:
            free_rows.append(row)
        elif c.vocab_size != vocab_size:
            raise ValueError(f"row {row}: constraint built for vocab_size {c.vocab_size}, not {vocab_size}")
        elif c.is_finished():
            eos_rows.append(row)
        else:
            jobs.append((c, row))
    if jobs:
        _executor().unsafe_compute_mask_ptr([(c._matcher, row) for c, row in jobs], words.data_ptr(),
                                            words.shape[1] * 4, words.shape[0])
        for c, row in jobs:
            c._check_words(words[row])
    mask = _unpack(words, vocab_size)
    for row in eos_rows:
        mask[row] = constraints[row]._eos_only()  # type: ignore[union-attr]
    mask[free_rows] = True
    return mask


_EXECUTOR: list[Any] = []


def _executor() -> Any:
    with _LOCK:
        if not _EXECUTOR:
            _EXECUTOR.append(_llguidance().LLExecutor())
        return _EXECUTOR[0]
