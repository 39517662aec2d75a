"""llama.cpp server /completion with n_probs: completion_probabilities in the newer shape ({id, token, bytes,
logprob, top_logprobs}, or prob/top_probs with post_sampling_probs) or the older one ({content, probs:
[{tok_str, prob}]}, post-sampling probabilities), and the sampler settings it echoes. Its OpenAI routes are
"openai"."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from qwen_ref.oracle.formats.openai import entry_token
from qwen_ref.oracle.formats.params import finish_params
from qwen_ref.oracle.formats.records import (
    Alternative,
    BackendRecord,
    BackendToken,
    as_number,
    attach_ids,
    get_field,
    set_prompt,
    token_ids,
)

_LLAMA_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "typical_p": 1.0,
                   "repeat_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0, "mirostat": 0,
                   "dry_multiplier": 0.0, "xtc_probability": 0.0, "top_n_sigma": -1.0, "dynatemp_range": 0.0}


def read_llama_cpp(response: dict[str, Any], request: dict[str, Any] | None, where: str) -> list[BackendRecord]:
    probs = get_field(response, "completion_probabilities", list, where)
    at = f"{where}: completion_probabilities"
    old = bool(probs) and isinstance(probs[0], dict) and "probs" in probs[0]
    if old:
        tokens, is_prob = [_old_token(p, f"{at}[{j}]") for j, p in enumerate(probs)], True
    else:
        parsed = [entry_token(p, f"{at}[{j}]") for j, p in enumerate(probs)]
        tokens, is_prob = [t for t, _ in parsed], bool(parsed) and all(p for _, p in parsed)
    ids = response.get("tokens")
    if ids:
        attach_ids(tokens, token_ids(ids, f"{where}: tokens"), f"{where}: tokens")
    record = BackendRecord(where, tokens, text=response.get("content") if isinstance(response.get("content"), str)
                           else None, logprobs_of="final" if is_prob else "raw")
    set_prompt(record, request, where)
    if record.prompt_ids is None and record.prompt_text is None and isinstance(response.get("prompt"), str):
        record.prompt_text = response["prompt"]
    settings = response.get("generation_settings")
    record.params = llama_cpp_params(settings if isinstance(settings, dict) else request, record.notes)
    return [record]


def _old_token(entry: Any, at: str) -> BackendToken:
    content = get_field(entry, "content", str, at)
    alts = []
    for k, p in enumerate(get_field(entry, "probs", list, at)):
        text = get_field(p, "tok_str", str, f"{at}.probs[{k}]")
        prob = as_number(get_field(p, "prob", (int, float), f"{at}.probs[{k}]"), f"{at}.probs[{k}].prob")
        alts.append(Alternative(math.log(prob) if prob > 0 else -math.inf, text=text))
    chosen = next((a.logprob for a in alts if a.text == content), None)
    return BackendToken(chosen, text=content, top=alts)


def llama_cpp_params(settings: Mapping[str, Any] | None, notes: list[str]) -> dict[str, Any] | None:
    """llama.cpp's effective settings (the response's generation_settings, else the request over llama.cpp's
    defaults). Its sampler is ours only with min_p 0, no penalties, no exotic samplers, and, because it applies
    temperature after top_p, temperature 1 whenever top_p < 1."""
    s = {**_LLAMA_DEFAULTS, **(settings or {})}
    t = s["temperature"]
    if not isinstance(t, (int, float)):
        notes.append("temperature unknown: greedy and sampler checks skipped")
        return None
    if t <= 0:
        return {"temperature": 0}
    blockers = [f"{k}={s[k]}" for k in ("min_p", "mirostat", "dry_multiplier", "xtc_probability", "dynatemp_range")
                if s[k]] + [f"{k}={s[k]}" for k in ("typical_p",) if s[k] < 1]
    blockers += [f"top_n_sigma={s['top_n_sigma']}"] if s["top_n_sigma"] > 0 else []
    blockers += [f"{k}={s[k]}" for k, neutral in (("repeat_penalty", 1), ("frequency_penalty", 0),
                                                   ("presence_penalty", 0)) if s[k] != neutral]
    if s["top_p"] < 1 and t != 1:
        blockers.append(f"top_p={s['top_p']} with temperature={t} (llama.cpp applies temperature after top_p)")
    if blockers:
        notes.append("llama.cpp sampler settings ours does not share: " + ", ".join(blockers)
                     + ": sampler checks skipped (greedy runs are still checked)")
        return None
    params = {"temperature": t}
    if s["top_k"] > 0:
        params["top_k"] = s["top_k"]
    if s["top_p"] < 1:
        params["top_p"] = s["top_p"]
    return finish_params(params, notes)
