"""TGI's /generate with "details": true (and "top_n_tokens": N, "decoder_input_details": true for the prompt):
details.tokens[] {id, text, logprob}, details.top_tokens[][], details.prefill[]. TGI's OpenAI route
(/v1/chat/completions) is "openai"."""

from __future__ import annotations

from typing import Any

from qwen_ref.oracle.files import BackendFileError
from qwen_ref.oracle.formats.params import openai_params
from qwen_ref.oracle.formats.records import (
    Alternative,
    BackendRecord,
    BackendToken,
    as_number,
    get_field,
    set_prompt,
    token_id,
)


def read_tgi(response: dict[str, Any], request: dict[str, Any] | None, where: str) -> list[BackendRecord]:
    details = get_field(response, "details", dict, where)
    at = f"{where}: details"
    entries = get_field(details, "tokens", list, at)
    tops = details.get("top_tokens") or [[] for _ in entries]
    if len(tops) != len(entries):
        raise BackendFileError(f"{at}: {len(tops)} top_tokens lists for {len(entries)} tokens")
    tokens = [_tgi_token(e, t, f"{at}.tokens[{j}]") for j, (e, t) in enumerate(zip(entries, tops))]
    record = BackendRecord(where, tokens, text=response.get("generated_text")
                           if isinstance(response.get("generated_text"), str) else None)
    prefill = details.get("prefill")
    if prefill:
        record.prompt_ids = [token_id(get_field(p, "id", int, f"{at}.prefill[{i}]"), f"{at}.prefill[{i}].id")
                             for i, p in enumerate(prefill)]
        record.prompt_tokens = [None if p.get("logprob") is None else _tgi_token(p, [], f"{at}.prefill[{i}]")
                                for i, p in enumerate(prefill)]
    set_prompt(record, request, where)
    if record.prompt_ids is None and isinstance((request or {}).get("inputs"), str):
        record.prompt_text = request["inputs"]
    params = dict((request or {}).get("parameters") or {})
    if params.get("temperature") is None:
        params["temperature"] = 1.0 if params.get("do_sample") else 0  # TGI's defaults
    record.params = openai_params(params, record.notes)
    return [record]


def _tgi_token(entry: Any, top: Any, at: str) -> BackendToken:
    if not isinstance(top, list):
        raise BackendFileError(f"{at}: top_tokens: expected a list")
    alts = [Alternative(as_number(get_field(t, "logprob", (int, float), at), at),
                        token_id(get_field(t, "id", int, at), at), t.get("text")) for t in top]
    return BackendToken(as_number(get_field(entry, "logprob", (int, float), at), f"{at}.logprob"),
                        token_id(get_field(entry, "id", int, at), f"{at}.id"), entry.get("text"), top=alts)
