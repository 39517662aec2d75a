"""JSON mode: a token mask from llguidance that keeps a request's output a JSON value matching its schema.

Stage 0 of the sampler (docs/sampling.md): before penalties, temperature, top-k and top-p, every token the
grammar does not allow gets -inf. The mask allows a token when its bytes extend the text so far towards a
complete JSON value; once the value is complete it allows only the eos ids, so generation ends there.
json_schema.py turns the request's response_format into the grammar; docs/json_mode.md describes what is
accepted and the limits. llguidance is optional: this module imports without it.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from qwen_ref.errors import JSON_MODE_NOT_MET, JsonModeNotMet, QwenRefError
from qwen_ref.sampling.json_schema import (
    InvalidJsonSchema,
    JsonModeUnavailable,
    Whitespace,
    check_schema,
    compile_grammar,
    json_schema_of,
    load_llguidance,
)

if TYPE_CHECKING:
    import llguidance

    from qwen_ref.tokenizer.runtime import QwenTokenizer

__all__ = [  # json_schema.py's public names too: JSON mode's callers import everything from here
    "JSON_MODE_NOT_MET",
    "InvalidJsonSchema",
    "JsonConstraint",
    "JsonConstraintError",
    "JsonModeNotMet",
    "JsonModeUnavailable",
    "Whitespace",
    "batch_allowed",
    "json_schema_of",
]


class JsonConstraintError(QwenRefError, RuntimeError):
    """A token the mask forbids was fed to advance(), or llguidance failed: a bug, not the caller's fault."""


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
    llg = load_llguidance()
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
        check_schema(schema, path)
        grammar = compile_grammar(schema, path, whitespace)
        return cls.from_grammar(grammar, tokenizer, vocab_size, eos_ids=eos_ids, path=path, schema=schema)

    @classmethod
    def from_grammar(cls, grammar: str, tokenizer: QwenTokenizer, vocab_size: int, *,
                     eos_ids: Sequence[int] | None = None, path: str = "/",
                     schema: dict[str, Any] | bool = True) -> JsonConstraint:
        """A constraint from an llguidance grammar (llguidance.grammar_from output, or Lark text with %json items,
        as the tool-call grammar of tool_choice 'required' is); InvalidJsonSchema at `path` if it cannot compile."""
        vocab = _vocab(tokenizer, vocab_size, eos_ids)
        llg = load_llguidance()
        matcher = llg.LLMatcher(vocab.ll, grammar, log_level=0)  # compiles the grammar: about 1 ms
        if matcher.is_error():
            raise InvalidJsonSchema(path, f"JSON mode cannot enforce this schema: {matcher.get_error()}")
        return cls(matcher, vocab, schema)

    def allowed_mask(self) -> torch.Tensor:
        """A new bool tensor [vocab_size] on the CPU: True where the token may come next. Raises
        JsonConstraintError if the matcher failed (after a refused token, or inside llguidance)."""
        self._check_not_failed()
        if self.is_finished():
            return self._eos_only()
        self._compute_words(self._words[0])
        self._check_words(self._words[0])
        return _unpack(self._words, self.vocab_size)[0]  # [1, V] -> [V]

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

    def _check_not_failed(self) -> None:
        # a matcher in an error state also reports is_stopped(); without this check it would look finished
        if self._matcher.is_error():
            raise JsonConstraintError(f"the JSON matcher is in an error state: {self._error()}")

    def _compute_words(self, target: torch.Tensor) -> None:
        self._matcher.unsafe_compute_mask_ptr(target.data_ptr(), target.numel() * 4)  # int32 words: 4 bytes each

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


def batch_allowed(constraints: Sequence[JsonConstraint | None],
                  vocab_size: int) -> tuple[torch.Tensor | None, dict[int, JsonConstraintError]]:
    """Stage 0 for a batch: bool [B, vocab_size] on the CPU (None when no row is in JSON mode), and the rows
    whose mask could not be computed, each with its error.

    Rows without a constraint allow every token, finished rows only the eos ids. A failed row also allows
    every token, so the batch can still be sampled; the caller fails that row alone. Whatever one row's
    constraint raises is caught for that row (as a JsonConstraintError), so one broken request never breaks
    the rows beside it. The constrained rows' masks are computed in parallel."""
    if all(c is None for c in constraints):
        return None, {}
    words = _words(vocab_size, len(constraints))
    failed: dict[int, JsonConstraintError] = {}
    eos_only: dict[int, torch.Tensor] = {}
    jobs: list[tuple[int, JsonConstraint]] = []
    for row, c in enumerate(constraints):
        if c is None:
            continue
        try:
            if c.vocab_size != vocab_size:
                raise JsonConstraintError(f"the constraint was built for vocab_size {c.vocab_size}, not {vocab_size}")
            c._check_not_failed()
            if c.is_finished():
                eos_only[row] = c._eos_only()
            else:
                jobs.append((row, c))
        except Exception as e:
            failed[row] = _row_error(e)
    if jobs:
        try:
            _executor().unsafe_compute_mask_ptr([(c._matcher, row) for row, c in jobs], words.data_ptr(),
                                                words.shape[1] * 4, words.shape[0])  # bytes per row, rows
            computed = True
        except Exception:  # the parallel call failed as a whole: compute each row alone, so only the bad row fails
            computed = False
        for row, c in jobs:
            try:
                if not computed:
                    c._compute_words(words[row])
                c._check_words(words[row])
            except Exception as e:
                failed[row] = _row_error(e)
    mask = _unpack(words, vocab_size)
    for row, eos in eos_only.items():
        mask[row] = eos
    mask[[row for row, c in enumerate(constraints) if c is None or row in failed]] = True
    return mask, failed


def _row_error(error: Exception) -> JsonConstraintError:
    if isinstance(error, JsonConstraintError):
        return error
    wrapped = JsonConstraintError(f"the JSON mask could not be computed: {type(error).__name__}: {error}")
    wrapped.__cause__ = error
    return wrapped


_EXECUTOR: list[Any] = []


def _executor() -> Any:
    with _LOCK:
        if not _EXECUTOR:
            _EXECUTOR.append(load_llguidance().LLExecutor())
        return _EXECUTOR[0]
