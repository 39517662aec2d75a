"""Sampling parameters as backends name them, turned into ours (Workers AI names and ranges, docs/sampling.md),
or None with a note saying why the sampler checks cannot run."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qwen_ref import sampling
from qwen_ref.errors import InvalidSamplingParams
from qwen_ref.sampling import SamplingParams

SAMPLING_FIELDS = tuple(f for f in sampling.SAMPLING_FIELDS if f != "max_tokens")  # what a backend's sampler uses
VLLM_GREEDY_BELOW = 1e-5  # vLLM samples greedily below this temperature


def without_max_tokens(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k != "max_tokens" and v is not None}


def finish_params(params: dict[str, Any], notes: list[str]) -> dict[str, Any] | None:
    try:
        return without_max_tokens(SamplingParams.from_dict(params).to_dict())
    except InvalidSamplingParams as e:
        notes.append(f"sampling parameters outside the Workers AI ranges ({e}): sampler checks skipped")
        return None


def openai_params(request: Mapping[str, Any] | None, notes: list[str]) -> dict[str, Any] | None:
    """An OpenAI/vLLM request's sampling fields by our names. vLLM fills absent fields from the model's
    generation_config.json (--generation-config auto), so absent fields are only neutral if it was off."""
    if not request:
        notes.append("no request with the sampling parameters: greedy and sampler checks skipped")
        return None
    if request.get("temperature") is None:
        notes.append("the request does not give temperature: greedy and sampler checks skipped")
        return None
    unsupported = [k for k, neutral in (("min_p", 0), ("typical_p", 1), ("logit_bias", None), ("top_a", 0))
                   if request.get(k) not in (None, neutral, {})]
    if unsupported:
        notes.append(f"{', '.join(unsupported)} not in our sampler: sampler checks skipped")
        return None
    neutral = {"repetition_penalty": 1, "frequency_penalty": 0, "presence_penalty": 0}
    params = {k: request[k] for k in SAMPLING_FIELDS if request.get(k) is not None and request[k] != neutral.get(k)}
    if isinstance(params.get("top_k"), int) and params["top_k"] <= 0:
        del params["top_k"]  # vLLM: -1 (or 0) disables top_k
    if isinstance(params.get("top_p"), (int, float)) and params["top_p"] >= 1:
        del params["top_p"]
    if isinstance(params["temperature"], (int, float)) and params["temperature"] < VLLM_GREEDY_BELOW:
        params["temperature"] = 0
    return finish_params(params, notes)
