"""OpenAI chat completions (choices[].logprobs.content[]) and legacy completions (choices[].logprobs.tokens), as
OpenAI, vLLM's server, llama.cpp's and TGI's OpenAI routes write them (vLLM's prompt_token_ids, prompt_logprobs
and choices[].token_ids extensions included)."""

from __future__ import annotations

import json
import math
from typing import Any

from qwen_ref.oracle.files import BackendFileError
from qwen_ref.oracle.formats.params import openai_params
from qwen_ref.oracle.formats.records import (
    Alternative,
    BackendRecord,
    BackendToken,
    as_number,
    as_object,
    attach_ids,
    byte_list,
    get_field,
    set_prompt,
    token_id,
    token_ids,
)
from qwen_ref.oracle.formats.vllm import prompt_logprobs


def read_openai(response: dict[str, Any], request: dict[str, Any] | None, where: str) -> list[BackendRecord]:
    choices = get_field(response, "choices", list, where)
    prompt_ids = response.get("prompt_token_ids")
    prompt_ids = None if prompt_ids is None else token_ids(prompt_ids, f"{where}: prompt_token_ids")
    prompt_lp = prompt_logprobs(response.get("prompt_logprobs"), prompt_ids, f"{where}: prompt_logprobs")
    records = []
    for i, choice in enumerate(choices):
        at = f"{where}: choices[{i}]"
        logprobs = get_field(choice, "logprobs", dict, at, optional=True)
        if logprobs is None:
            raise BackendFileError(f"{at}: has no logprobs; ask for them (chat: \"logprobs\": true, "
                                   "\"top_logprobs\": N; completions: \"logprobs\": N)")
        if "content" in logprobs:
            tokens, is_prob = _chat_tokens(logprobs, f"{at}.logprobs")
        else:
            tokens, is_prob = _legacy_tokens(logprobs, f"{at}.logprobs"), False
        ids = choice.get("token_ids")
        if ids is not None:
            attach_ids(tokens, token_ids(ids, f"{at}.token_ids"), f"{at}.token_ids")
        message = choice.get("message")
        text = message.get("content") if isinstance(message, dict) else choice.get("text")
        record = BackendRecord(f"{where}" + (f" choice {i}" if len(choices) > 1 else ""), tokens,
                               prompt_ids=prompt_ids, text=text if isinstance(text, str) else None,
                               prompt_tokens=prompt_lp, logprobs_of="final" if is_prob else "raw")
        set_prompt(record, request, where)
        record.params = openai_params(request, record.notes)
        records.append(record)
    return records


def _chat_tokens(logprobs: dict[str, Any], at: str) -> tuple[list[BackendToken], bool]:
    content = get_field(logprobs, "content", list, at)
    tokens, probs = [], set()
    for j, entry in enumerate(content):
        token, is_prob = entry_token(entry, f"{at}.content[{j}]")
        tokens.append(token)
        probs.add(is_prob)
    return tokens, probs == {True}


def _legacy_tokens(logprobs: dict[str, Any], at: str) -> list[BackendToken]:
    texts = get_field(logprobs, "tokens", list, at)
    values = get_field(logprobs, "token_logprobs", list, at)
    tops = logprobs.get("top_logprobs") or [None] * len(texts)
    if not (len(texts) == len(values) == len(tops)):
        raise BackendFileError(f"{at}: tokens, token_logprobs and top_logprobs have different lengths "
                               f"({len(texts)}, {len(values)}, {len(tops)})")
    tokens = []
    for j, (text, value, top) in enumerate(zip(texts, values, tops)):
        if not isinstance(text, str):
            raise BackendFileError(f"{at}.tokens[{j}]: expected a string")
        alts = [] if top is None else [Alternative(as_number(v, f"{at}.top_logprobs[{j}][{k!r}]"), text=k)
                                       for k, v in as_object(top, f"{at}.top_logprobs[{j}]").items()]
        lp = None if value is None else as_number(value, f"{at}.token_logprobs[{j}]")
        tokens.append(BackendToken(lp, text=text, top=sorted(alts, key=lambda a: -a.logprob)))
    return tokens


def entry_token(entry: Any, at: str) -> tuple[BackendToken, bool]:
    """An OpenAI chat `logprobs.content[i]` (also llama.cpp's completion_probabilities[i], which adds `id`), and
    whether its numbers are probabilities after the sampler (llama.cpp's post_sampling_probs)."""
    if not isinstance(entry, dict):
        raise BackendFileError(f"{at}: expected a JSON object, got {json.dumps(entry)[:60]}")
    logprob, is_prob = _logprob_of(entry, at)
    tops = entry.get("top_probs" if "top_probs" in entry else "top_logprobs") or []
    if not isinstance(tops, list):
        raise BackendFileError(f"{at}.top_logprobs: expected a list")
    top = []
    for j, alt in enumerate(tops):
        alt_at = f"{at}.top_logprobs[{j}]"
        if not isinstance(alt, dict):
            raise BackendFileError(f"{alt_at}: expected a JSON object")
        lp, _ = _logprob_of(alt, alt_at)
        if lp is None:
            raise BackendFileError(f"{alt_at}: has no logprob")
        top.append(Alternative(lp, _optional_id(alt, alt_at), alt.get("token"), byte_list(alt.get("bytes"),
                                                                                        f"{alt_at}.bytes")))
    token = BackendToken(logprob, _optional_id(entry, at), entry.get("token"),
                         byte_list(entry.get("bytes"), f"{at}.bytes"), top)
    return token, is_prob


def _logprob_of(entry: dict[str, Any], at: str) -> tuple[float | None, bool]:
    """(logprob, is_probability): llama.cpp's post_sampling_probs gives "prob" instead of "logprob"."""
    if "prob" in entry and "logprob" not in entry:
        p = as_number(entry["prob"], f"{at}.prob")
        return (math.log(p) if p > 0 else -math.inf), True
    if entry.get("logprob") is None:
        return None, False
    return as_number(entry["logprob"], f"{at}.logprob"), False


def _optional_id(entry: dict[str, Any], at: str) -> int | None:
    return None if entry.get("id") is None else token_id(entry["id"], f"{at}.id")
