"""The plain format, one generation per line: {"prompt_ids" (or "prompt" raw text, or "request" a Workers AI
body), "token_ids", "logprobs", "top_logprobs": [[[id, logprob], ...], ...], "params": {...}}; optional
"final_logprobs" (under the backend's final distribution), "logprobs_of" ("raw" or "final"), "prompt_logprobs"
and "prompt_top_logprobs" (aligned with the prompt, null first), "text"."""

from __future__ import annotations

import json
from typing import Any

from qwen_ref.errors import InvalidSamplingParams
from qwen_ref.oracle.files import BackendFileError
from qwen_ref.oracle.formats.params import SAMPLING_FIELDS, without_max_tokens
from qwen_ref.oracle.formats.records import (
    Alternative,
    BackendRecord,
    BackendToken,
    as_number,
    as_object,
    get_field,
    maybe_number,
    token_id,
    token_ids,
)
from qwen_ref.sampling import SamplingParams


def read_jsonl(obj: dict[str, Any], request: dict[str, Any] | None, where: str) -> list[BackendRecord]:
    ids = token_ids(get_field(obj, "token_ids", list, where), f"{where}: token_ids")
    n = len(ids)
    logprobs = _aligned(obj, "logprobs", n, where)
    tops = _aligned(obj, "top_logprobs", n, where)
    finals = _aligned(obj, "final_logprobs", n, where)
    tokens = [BackendToken(maybe_number(logprobs[j], f"{where}: logprobs[{j}]"), ids[j],
                           top=_pairs(tops[j], f"{where}: top_logprobs[{j}]"),
                           final_logprob=maybe_number(finals[j], f"{where}: final_logprobs[{j}]"))
              for j in range(n)]
    record = BackendRecord(where, tokens, text=obj.get("text") if isinstance(obj.get("text"), str) else None)
    if obj.get("prompt_ids") is not None:
        record.prompt_ids = token_ids(obj["prompt_ids"], f"{where}: prompt_ids")
    elif isinstance(obj.get("request"), dict):
        record.request = obj["request"]
    elif isinstance(obj.get("prompt"), str):
        record.prompt_text = obj["prompt"]
    record.prompt_tokens = _prompt(obj, record.prompt_ids, where)
    kind = obj.get("logprobs_of", "raw")
    if kind not in ("raw", "final"):
        raise BackendFileError(f"{where}: logprobs_of: {kind!r} is not 'raw' or 'final'")
    record.logprobs_of = kind
    params = obj.get("params")
    if params is None and isinstance(record.request, dict):
        params = {k: record.request[k] for k in SAMPLING_FIELDS if k in record.request} or None
    if params is None:
        record.notes.append("no params: greedy and sampler checks skipped")
    else:
        try:
            fields = without_max_tokens(as_object(params, f"{where}: params"))
            record.params = without_max_tokens(SamplingParams.from_dict(fields).to_dict())
        except InvalidSamplingParams as e:
            raise BackendFileError(f"{where}: params: {e}") from None
    return [record]


def _aligned(obj: dict[str, Any], key: str, n: int, where: str) -> list[Any]:
    value = obj.get(key)
    if value is None:
        return [None] * n
    if not isinstance(value, list) or len(value) != n:
        raise BackendFileError(f"{where}: {key} must be a list with one entry per token ({n})")
    return value


def _pairs(value: Any, at: str) -> list[Alternative]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise BackendFileError(f"{at}: expected a list of [id, logprob] pairs")
    out = []
    for k, pair in enumerate(value):
        if not isinstance(pair, list) or len(pair) != 2:
            raise BackendFileError(f"{at}[{k}]: expected [id, logprob], got {json.dumps(pair)[:60]}")
        out.append(Alternative(as_number(pair[1], f"{at}[{k}][1]"), token_id(pair[0], f"{at}[{k}][0]")))
    return out


def _prompt(obj: dict[str, Any], prompt_ids: list[int] | None, where: str) -> list[BackendToken | None] | None:
    values = obj.get("prompt_logprobs")
    if values is None:
        return None
    if prompt_ids is None or not isinstance(values, list) or len(values) != len(prompt_ids):
        raise BackendFileError(f"{where}: prompt_logprobs needs prompt_ids and one entry per prompt token")
    tops = _aligned(obj, "prompt_top_logprobs", len(prompt_ids), where)
    return [None if v is None else BackendToken(as_number(v, f"{where}: prompt_logprobs[{i}]"), prompt_ids[i],
                                                top=_pairs(tops[i], f"{where}: prompt_top_logprobs[{i}]"))
            for i, v in enumerate(values)]
