"""The reference's numbers for given tokens: teacher forcing (`next_token_logits`), raw logprobs, and `score`.

Where the numbers come from: the reference model runs in the dtype it was loaded in (float64 for ground truth)
over the exact token ids, one causal pass per sequence through the KV cache; every logprob is log_softmax of the
logits widened to float64; the final sampling distribution is `qwen_ref.sampling.distribution` with the
sequence's prompt and output so far as the penalty history.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from qwen_ref.engine import DEFAULT_PREFILL_CHUNK
from qwen_ref.errors import InvalidSamplingParams, QwenRefError
from qwen_ref.oracle.files import ScoreInputError, finite_or_none
from qwen_ref.oracle.formats.params import SAMPLING_FIELDS
from qwen_ref.qwen import Qwen
from qwen_ref.sampling import SamplingParams, distribution
from qwen_ref.workers_ai.request import prompt_text

CHUNK = DEFAULT_PREFILL_CHUNK  # tokens per forward when teacher-forcing, as the engine's prefill chunks a prompt


# ----------------------------------------------------------------------------------------------------------
# The reference at each position


def check_ready(qwen: Qwen) -> None:
    if qwen.tokenizer is None:
        raise QwenRefError(f"the checkpoint {qwen.path} has no tokenizer files; score and compare need them")


@torch.inference_mode()
def next_token_logits(qwen: Qwen, ids: Sequence[int], first: int, chunk: int = CHUNK) -> Iterator[Tensor]:
    """The logits [V] that predict ids[i], for i = first .. len(ids) - 1. The whole sequence goes through the KV
    cache `chunk` tokens per forward, at multiples of `chunk`, with every position's logits from the chunk's own
    lm_head product: the chunks, and so the numbers, of the engine's prefill with prompt logprobs (a server's
    echo + logprobs) when `chunk` is its prefill_chunk. Chunks before `first` only fill the cache. A model loaded
    with offload="disk" runs the whole sequence as one chunk (one read of the weights)."""
    if not 1 <= first < len(ids):
        return
    if getattr(qwen.model, "streamer", None) is not None:
        chunk = len(ids)  # offload="disk": every pass streams all the weights, so the sequence is one pass
    device = qwen.device
    cache = qwen.model.new_cache(1, len(ids))
    for start in range(0, len(ids), chunk):
        piece = list(ids[start : start + chunk])
        needed = start + len(piece) > first - 1  # a position of this chunk predicts ids[first] or later
        rows = qwen.model(torch.tensor([piece], device=device), cache=cache, compute_logits=needed)
        if needed:
            yield from rows[0, max(first - 1 - start, 0) : len(ids) - 1 - start]


def raw_logprobs(logits: Tensor) -> Tensor:
    return torch.log_softmax(logits.to(torch.float64), dim=-1)  # numerics: widening is exact; log-softmax in float64


def top(values: Tensor, n: int) -> list[tuple[int, float]]:
    """The n best (id, value), value descending, ties by lower id; -inf entries are left out."""
    if n <= 0:
        return []
    best, ids = torch.topk(values, min(n + 1, values.shape[-1]))
    if len(best) > n and best[n] == best[n - 1]:  # a tie at the n-th: every tied id competes for the last places
        ids = torch.nonzero(values >= best[n - 1]).flatten()
    picked = sorted(zip(ids.tolist(), values[ids].tolist()), key=lambda p: (-p[1], p[0]))[:n]
    return [(i, v) for i, v in picked if v > -math.inf]


def rank(values: Tensor, token: int) -> int:
    return 1 + int((values > values[token]).sum())


def log_or_inf(p: float) -> float:
    return math.log(p) if p > 0 else -math.inf


# ----------------------------------------------------------------------------------------------------------
# score


@dataclass
class _Sequence:
    prompt_ids: list[int]
    token_ids: list[int]
    params: SamplingParams | None
    name: Any


def _as_sequence(qwen: Qwen, item: Any, where: str) -> _Sequence:
    """A sequence to score: (prompt_ids, token_ids); {"prompt_ids", "token_ids"}; {"prompt", "completion"} (raw
    text, each part tokenized on its own); {"request": Workers AI body, "completion" | "token_ids"} (the chat
    template applied as generate() does; the request's sampling fields become params); {"text"} (every
    position after the first). Optional "params" (sampling fields) and "id"."""
    tok = qwen.tokenizer
    if isinstance(item, (tuple, list)) and len(item) == 2:
        item = {"prompt_ids": item[0], "token_ids": item[1]}
    if not isinstance(item, Mapping):
        raise ScoreInputError(f"{where}: expected an object or a (prompt_ids, token_ids) pair")
    params = item.get("params")
    try:
        if "text" in item:
            ids = tok.encode(_text(item, "text", where))
            prompt, tokens = ids[:1], ids[1:]
        elif "request" in item:
            body = item["request"]
            if not isinstance(body, Mapping):
                raise ScoreInputError(f"{where}: request: expected a Workers AI request body")
            prompt = tok.encode(prompt_text(qwen, dict(body))[0])
            tokens = _continuation(tok, item, where)
            if params is None:
                params = {k: body[k] for k in SAMPLING_FIELDS if k in body} or None
        elif "prompt_ids" in item:
            prompt, tokens = _score_ids(item["prompt_ids"], f"{where}: prompt_ids"), _continuation(tok, item, where)
        elif "prompt" in item:
            prompt, tokens = tok.encode(_text(item, "prompt", where)), _continuation(tok, item, where)
        else:
            raise ScoreInputError(f"{where}: needs prompt_ids, prompt, request or text")
    except QwenRefError as e:
        if isinstance(e, ScoreInputError):
            raise
        raise ScoreInputError(f"{where}: {e}") from None
    for i in [*prompt, *tokens]:
        if i >= qwen.config.vocab_size:
            raise ScoreInputError(f"{where}: token id {i} is outside the model's vocabulary of "
                                  f"{qwen.config.vocab_size}")
    if not prompt:
        raise ScoreInputError(f"{where}: the prompt has no tokens (the first token has nothing to be predicted from)")
    try:
        sp = None if params is None else SamplingParams.from_dict(
            {k: v for k, v in dict(params).items() if k != "max_tokens"})
    except (InvalidSamplingParams, TypeError) as e:
        raise ScoreInputError(f"{where}: params: {e}") from None
    return _Sequence(prompt, tokens, sp, item.get("id"))


def _text(item: Mapping[str, Any], key: str, where: str) -> str:
    if not isinstance(item[key], str):
        raise ScoreInputError(f"{where}: {key}: expected a string")
    return item[key]


def _score_ids(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                              for i in value):
        raise ScoreInputError(f"{where}: expected a list of token ids (non-negative integers)")
    return value


def _continuation(tok: Any, item: Mapping[str, Any], where: str) -> list[int]:
    if "token_ids" in item:
        return _score_ids(item["token_ids"], f"{where}: token_ids")
    if "completion" in item:
        return tok.encode(_text(item, "completion", where))
    raise ScoreInputError(f"{where}: needs token_ids or completion (the continuation to score)")


def _token_text(tok: Any, token: int) -> dict[str, Any]:
    data = tok.token_bytes(token)
    text = tok.decode([token])
    out: dict[str, Any] = {"text": text}
    if text.encode("utf-8") != data:  # part of a UTF-8 character, or not valid UTF-8 on its own
        out["bytes"] = list(data)
    return out


def score(qwen: Qwen, sequences: Iterable[Any], top_n: int = 5, *, chunk: int = CHUNK) -> Iterator[dict[str, Any]]:
    """Teacher-force each sequence and yield one record per continuation token: its position in the whole
    sequence, step in the continuation, id, text, logprob under the raw distribution (float64), rank (1 = the
    most likely; 1 + the number of tokens with a strictly larger logprob) and the top-N alternatives; with
    params also final_logprob (null when the final distribution gives it probability 0) and in_support."""
    check_ready(qwen)
    tok = qwen.tokenizer
    for index, item in enumerate(sequences):
        seq = _as_sequence(qwen, item, f"sequence {index}")
        ids = seq.prompt_ids + seq.token_ids
        rows = next_token_logits(qwen, ids, len(seq.prompt_ids), chunk)
        for step, (token, logits) in enumerate(zip(seq.token_ids, rows)):
            lp = raw_logprobs(logits)
            record: dict[str, Any] = {"sequence": index}
            if seq.name is not None:
                record["id"] = seq.name
            record |= {"position": len(seq.prompt_ids) + step, "step": step, "token": token,
                       **_token_text(tok, token), "logprob": finite_or_none(float(lp[token])),
                       "rank": rank(lp, token),
                       "top": [{"id": i, "text": tok.decode([i]), "logprob": v} for i, v in top(lp, top_n)]}
            if seq.params is not None:
                p = float(distribution(logits, seq.params, seq.prompt_ids, seq.token_ids[:step])[token])
                record["final_logprob"] = finite_or_none(log_or_inf(p))
                record["in_support"] = p > 0
            yield record

