"""vLLM's offline RequestOutput as JSON, and its logprob dicts {token id: {logprob, rank, decoded_token}}, which
its OpenAI server also writes for the prompt_logprobs extension. vLLM's server output is otherwise "openai"."""

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
    token_ids,
)


def read_vllm(response: dict[str, Any], request: dict[str, Any] | None, where: str) -> list[BackendRecord]:
    """vLLM's offline RequestOutput as JSON: prompt_token_ids, prompt_logprobs, outputs[].token_ids and
    outputs[].logprobs (a list of {token id: {logprob, rank, decoded_token}})."""
    outputs = get_field(response, "outputs", list, where)
    prompt_ids = response.get("prompt_token_ids")
    prompt_ids = None if prompt_ids is None else token_ids(prompt_ids, f"{where}: prompt_token_ids")
    prompt_lp = prompt_logprobs(response.get("prompt_logprobs"), prompt_ids, f"{where}: prompt_logprobs")
    settings = request or response.get("sampling_params") or response.get("params")
    records = []
    for i, out in enumerate(outputs):
        at = f"{where}: outputs[{i}]"
        ids = token_ids(get_field(out, "token_ids", list, at), f"{at}.token_ids")
        logprobs = get_field(out, "logprobs", list, at, optional=True)
        if logprobs is None:
            raise BackendFileError(f"{at}: has no logprobs; pass SamplingParams(logprobs=N)")
        if len(logprobs) != len(ids):
            raise BackendFileError(f"{at}: {len(logprobs)} logprobs entries for {len(ids)} token ids")
        tokens = [vllm_position(lp, t, f"{at}.logprobs[{j}]") for j, (lp, t) in enumerate(zip(logprobs, ids))]
        text = out.get("text")
        record = BackendRecord(f"{where}" + (f" output {i}" if len(outputs) > 1 else ""), tokens,
                               prompt_ids=prompt_ids, text=text if isinstance(text, str) else None,
                               prompt_tokens=prompt_lp)
        if prompt_ids is None and isinstance(response.get("prompt"), str):
            record.prompt_text = response["prompt"]
        set_prompt(record, request, where)
        record.params = openai_params(settings, record.notes)
        records.append(record)
    return records


def vllm_position(entry: Any, chosen_id: int | None, at: str) -> BackendToken:
    """One position of vLLM's logprobs or prompt_logprobs: {id: {logprob, rank, decoded_token}} holding the
    chosen token and the top-N. Without `chosen_id` (prompt logprobs without prompt ids) the chosen token is
    the first entry, where vLLM puts it."""
    if not isinstance(entry, dict) or not entry:
        raise BackendFileError(f"{at}: expected a non-empty object {{token id: {{logprob, rank, decoded_token}}}}")
    parsed: list[tuple[int, float, int | None, str | None]] = []
    for key, value in entry.items():
        where = f"{at}[{key!r}]"
        if isinstance(value, dict):
            rank = value.get("rank")
            parsed.append((token_id(key, where), as_number(value.get("logprob"), f"{where}.logprob"),
                           rank if isinstance(rank, int) else None, value.get("decoded_token")))
        else:
            parsed.append((token_id(key, where), as_number(value, where), None, None))
    chosen = parsed[0] if chosen_id is None else next((p for p in parsed if p[0] == chosen_id), None)
    if chosen is None:
        raise BackendFileError(f"{at}: the generated token {chosen_id} is not among the ids of this position")
    others = [p for p in parsed if p[0] != chosen[0]]
    in_top = chosen[2] is None or chosen[2] <= len(others)  # else it is the extra entry beside the top-N
    top = sorted(parsed if in_top else others, key=lambda p: -p[1])
    return BackendToken(chosen[1], chosen[0], chosen[3], None, [Alternative(p[1], p[0], p[3]) for p in top])


def prompt_logprobs(value: Any, prompt_ids: list[int] | None, at: str) -> list[BackendToken | None] | None:
    """vLLM's prompt_logprobs (null first), aligned with the prompt ids when they are given."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise BackendFileError(f"{at}: expected a list (null for the first prompt token)")
    if prompt_ids is not None and len(value) != len(prompt_ids):
        raise BackendFileError(f"{at}: {len(value)} entries for {len(prompt_ids)} prompt tokens")
    return [None if v is None else vllm_position(v, None if prompt_ids is None else prompt_ids[i], f"{at}[{i}]")
            for i, v in enumerate(value)]
