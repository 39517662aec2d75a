"""The oracle: the reference's numbers for given tokens (`score`), and `compare`, which checks another backend's
generations against the reference position by position: its logprobs, its greedy choices and its sampler.

Where the numbers come from: the reference model runs in the dtype it was loaded in (float64 for ground truth)
over the exact token ids, through one causal pass per sequence; every logprob is log_softmax of the logits
widened to float64; the final sampling distribution is `qwen_ref.sampling.distribution` with the sequence's
prompt and output so far as the penalty history. docs/oracle.md is the user's guide.
"""

from __future__ import annotations

import argparse
import codecs
import json
import math
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from qwen_ref.dtypes import dtype_name
from qwen_ref.errors import InvalidSamplingParams, QwenRefError
from qwen_ref.models.kv_cache import KVCache
from qwen_ref.qwen import Qwen
from qwen_ref.sampling.sampler import History, PenaltyState, SamplingParams, distribution, frequency_presence_penalty
from qwen_ref.sampling.sampler import repetition_penalty as apply_repetition_penalty

FORMATS = ("auto", "openai", "vllm", "llama.cpp", "tgi", "jsonl")
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "seed", "repetition_penalty", "frequency_penalty",
                   "presence_penalty")
LOG_FLOOR = -9999.0  # vLLM's OpenAI server clamps logprobs here; llama.cpp writes log(0) as -FLT_MAX
FLOAT32_EXP_UNDERFLOW = -87.0  # a float32 softmax gives exactly 0 (a backend's log(0)) below about this logprob
VLLM_GREEDY_BELOW = 1e-5  # vLLM samples greedily below this temperature
CHUNK = 64  # tokens per forward when teacher-forcing: bounds the logits held at once to CHUNK x vocab

# |logprob difference| accepted for a backend computing in each dtype, against a float64 reference. Measured on
# the tiny qwen2.5 checkpoint (transformers eager vs our float64, teacher-forced and generated sequences):
# float32 max 4.0e-5 (mean 8e-6), float16 max 2.0e-2 (mean 3.8e-3), bfloat16 max 1.2e-1 (mean 2.6e-2). Real
# checkpoints are 10-30x deeper and wider and their error grows with depth and logit scale, so each bound is
# 4x to 12x the tiny model's maximum. float64: a pure float64 run agrees to ~1e-12, but transformers' float64
# keeps three float32 steps (RMSNorm, softmax, rotary angles), which put it 1.5e-5 off on the tiny model at
# position ~20 (the float32 rotary angle error grows with the position).
LOGPROB_TOLERANCE = {"float64": 1e-4, "float32": 5e-4, "float16": 0.1, "bfloat16": 0.5}
_PRECISION_ORDER = ("float64", "float32", "float16", "bfloat16")


class OracleFileError(QwenRefError, ValueError):
    """An input of score or compare cannot be used: the message names the file, the line and what is wrong."""


class BackendFileError(OracleFileError):
    """A backend's output file is malformed or lacks what the comparison needs."""


class ScoreInputError(OracleFileError):
    """A sequence given to score is malformed."""


# ----------------------------------------------------------------------------------------------------------
# Thresholds


@dataclass(frozen=True)
class Thresholds:
    """What counts as a disagreement. `logprob` bounds |backend - reference| of a token's raw logprob and the
    margin by which our greedy token may beat the backend's; final-distribution logprobs get logprob / T
    (z / T scales logit errors by 1 / T). `kl` bounds KL(reference || backend) over the shared top-N, after
    renormalising both there. A sampled token outside our support is flagged only when it is further than
    `support_logit` below the top_k boundary (logit units) or `support_mass` / T past the top_p boundary
    (probability mass): closer than that, rounding may legitimately move the boundary."""

    logprob: float
    kl: float
    support_logit: float
    support_mass: float

    @classmethod
    def from_logprob(cls, logprob: float) -> Thresholds:
        # with every |error| <= e, KL over a renormalised set is ~ Var(error) / 2 <= e^2 / 2; the mass above
        # a top_p boundary moves by a probability-weighted mean of the errors, about e / 2 at worst in practice
        return cls(logprob, logprob**2 / 2, logprob, logprob / 2)

    @classmethod
    def for_dtype(cls, dtype: str) -> Thresholds:
        if dtype not in LOGPROB_TOLERANCE:
            raise QwenRefError(f"backend dtype: {dtype!r} is not one of {', '.join(LOGPROB_TOLERANCE)}")
        return cls.from_logprob(LOGPROB_TOLERANCE[dtype])

    @classmethod
    def for_dtypes(cls, backend: str, reference: str) -> Thresholds:
        """The looser of the two: a bfloat16 reference cannot check a float32 backend to float32 accuracy."""
        worst = max(backend, reference, key=lambda d: _PRECISION_ORDER.index(d) if d in _PRECISION_ORDER else 0)
        return cls.for_dtype(worst)

    def describe(self) -> str:
        return (f"|dlogprob| {self.logprob:g}, KL {self.kl:.3g}, top_k margin {self.support_logit:g}, "
                f"top_p mass {self.support_mass:g}/T")


# ----------------------------------------------------------------------------------------------------------
# Backend records: what a reader makes of one generation in any format


@dataclass
class Alternative:
    """One of a backend's top-N alternatives at a position."""

    logprob: float
    id: int | None = None
    text: str | None = None
    bytes: bytes | None = None


@dataclass
class BackendToken:
    """One position of a backend's output: the token (by id, bytes or text, whichever the format gives), its
    logprob, the top-N alternatives, and optionally its logprob under the backend's final sampling distribution."""

    logprob: float | None = None
    id: int | None = None
    text: str | None = None
    bytes: bytes | None = None
    top: list[Alternative] = field(default_factory=list)
    final_logprob: float | None = None


@dataclass
class BackendRecord:
    """One generation. The prompt is `prompt_ids`, else the Workers AI body `request` (chat template applied as
    generate() does), else the raw `prompt_text`. `params` are sampling fields by Workers AI name, or None
    when unknown (`notes` says why). `logprobs_of` says which distribution the token logprobs and top lists
    are of: "raw" (the model's) or "final" (after the backend's sampler)."""

    source: str
    tokens: list[BackendToken]
    prompt_ids: list[int] | None = None
    request: dict[str, Any] | None = None
    prompt_text: str | None = None
    params: dict[str, Any] | None = None
    text: str | None = None  # the whole output text, used to recover tokens shown only as U+FFFD
    prompt_tokens: list[BackendToken | None] | None = None  # prompt logprobs, aligned with the prompt
    logprobs_of: str = "raw"
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------
# Reading files


def _json_objects(path: Path, error: type[OracleFileError]) -> Iterator[tuple[str, Any]]:
    """(where, object) for a JSONL file, a JSON array of objects, or one JSON document ("-": stdin)."""
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if text.lstrip().startswith("data:"):
        raise error(f"{path}:1: this is a stream of server-sent events; save the non-streaming response "
                    "(stream: false) instead")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, list):
        for i, obj in enumerate(whole):
            yield f"{path}: item {i}", obj
        return
    if isinstance(whole, dict):
        yield f"{path}:1", whole
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{n}", json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None


def _get(obj: Any, key: str, kind: type | tuple[type, ...], at: str, *, optional: bool = False) -> Any:
    if not isinstance(obj, dict):
        raise BackendFileError(f"{at}: expected a JSON object, got {type(obj).__name__}")
    value = obj.get(key)
    if value is None and optional:
        return None
    if value is None:
        raise BackendFileError(f"{at}: the field {key!r} is missing")
    if isinstance(value, bool) or not isinstance(value, kind):
        names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise BackendFileError(f"{at}.{key}: expected {names}, got {json.dumps(value)[:60]}")
    return value


def _object(value: Any, at: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BackendFileError(f"{at}: expected a JSON object, got {json.dumps(value)[:60]}")
    return value


def _number(value: Any, at: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BackendFileError(f"{at}: expected a number, got {json.dumps(value)[:60]}")
    return float(value)


def _maybe_number(value: Any, at: str) -> float | None:
    return None if value is None else _number(value, at)


def _token_id(value: Any, at: str) -> int:
    if isinstance(value, str) and value.lstrip("-").isdigit():
        value = int(value)  # vLLM's logprob dicts have string keys in JSON
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BackendFileError(f"{at}: expected a token id (a non-negative integer), got {json.dumps(value)[:60]}")
    return value


def _ids(value: Any, at: str) -> list[int]:
    if not isinstance(value, list):
        raise BackendFileError(f"{at}: expected a list of token ids, got {json.dumps(value)[:60]}")
    return [_token_id(v, f"{at}[{i}]") for i, v in enumerate(value)]


def _byte_list(value: Any, at: str) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(b, int) and 0 <= b < 256 for b in value):
        raise BackendFileError(f"{at}: expected a list of byte values 0..255")
    return bytes(value)


def _logprob_of(entry: dict[str, Any], at: str) -> tuple[float | None, bool]:
    """(logprob, is_probability): llama.cpp's post_sampling_probs gives "prob" instead of "logprob"."""
    if "prob" in entry and "logprob" not in entry:
        p = _number(entry["prob"], f"{at}.prob")
        return (math.log(p) if p > 0 else -math.inf), True
    if entry.get("logprob") is None:
        return None, False
    return _number(entry["logprob"], f"{at}.logprob"), False


def _entry_token(entry: Any, at: str) -> tuple[BackendToken, bool]:
    """An OpenAI chat `logprobs.content[i]` (also llama.cpp's completion_probabilities[i], which adds `id`)."""
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
        top.append(Alternative(lp, _optional_id(alt, alt_at), alt.get("token"), _byte_list(alt.get("bytes"),
                                                                                         f"{alt_at}.bytes")))
    token = BackendToken(logprob, _optional_id(entry, at), entry.get("token"),
                         _byte_list(entry.get("bytes"), f"{at}.bytes"), top)
    return token, is_prob


def _optional_id(entry: dict[str, Any], at: str) -> int | None:
    return None if entry.get("id") is None else _token_id(entry["id"], f"{at}.id")


def _vllm_position(entry: Any, token_id: int | None, at: str) -> BackendToken:
    """One position of vLLM's logprobs or prompt_logprobs: {id: {logprob, rank, decoded_token}} holding the
    chosen token and the top-N. Without `token_id` (prompt logprobs without prompt ids) the chosen token is
    the first entry, where vLLM puts it."""
    if not isinstance(entry, dict) or not entry:
        raise BackendFileError(f"{at}: expected a non-empty object {{token id: {{logprob, rank, decoded_token}}}}")
    parsed: list[tuple[int, float, int | None, str | None]] = []
    for key, value in entry.items():
        where = f"{at}[{key!r}]"
        if isinstance(value, dict):
            rank = value.get("rank")
            parsed.append((_token_id(key, where), _number(value.get("logprob"), f"{where}.logprob"),
                           rank if isinstance(rank, int) else None, value.get("decoded_token")))
        else:
            parsed.append((_token_id(key, where), _number(value, where), None, None))
    chosen = parsed[0] if token_id is None else next((p for p in parsed if p[0] == token_id), None)
    if chosen is None:
        raise BackendFileError(f"{at}: the generated token {token_id} is not among the ids of this position")
    others = [p for p in parsed if p[0] != chosen[0]]
    in_top = chosen[2] is None or chosen[2] <= len(others)  # else it is the extra entry beside the top-N
    top = sorted(parsed if in_top else others, key=lambda p: -p[1])
    return BackendToken(chosen[1], chosen[0], chosen[3], None, [Alternative(p[1], p[0], p[3]) for p in top])


def _prompt_logprobs(value: Any, prompt_ids: list[int] | None, at: str) -> list[BackendToken | None] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise BackendFileError(f"{at}: expected a list (null for the first prompt token)")
    if prompt_ids is not None and len(value) != len(prompt_ids):
        raise BackendFileError(f"{at}: {len(value)} entries for {len(prompt_ids)} prompt tokens")
    return [None if v is None else _vllm_position(v, None if prompt_ids is None else prompt_ids[i], f"{at}[{i}]")
            for i, v in enumerate(value)]


# -- sampling parameters as each backend names them


def _finish_params(params: dict[str, Any], notes: list[str]) -> dict[str, Any] | None:
    try:
        return _without_max_tokens(SamplingParams.from_dict(params).to_dict())
    except InvalidSamplingParams as e:
        notes.append(f"sampling parameters outside the Workers AI ranges ({e}): sampler checks skipped")
        return None


def _without_max_tokens(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k != "max_tokens" and v is not None}


def _openai_params(request: Mapping[str, Any] | None, notes: list[str]) -> dict[str, Any] | None:
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
    return _finish_params(params, notes)


_LLAMA_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "typical_p": 1.0,
                   "repeat_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0, "mirostat": 0,
                   "dry_multiplier": 0.0, "xtc_probability": 0.0, "top_n_sigma": -1.0, "dynatemp_range": 0.0}


def _llama_cpp_params(settings: Mapping[str, Any] | None, notes: list[str]) -> dict[str, Any] | None:
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
    return _finish_params(params, notes)


def _chat_request(request: Mapping[str, Any]) -> dict[str, Any]:
    """An OpenAI chat request's messages (text parts joined) and tools, as a Workers AI body."""
    messages = []
    for m in request["messages"]:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            m = {**m, "content": "".join(p.get("text", "") for p in content if isinstance(p, dict))}
        messages.append(m)
    body: dict[str, Any] = {"messages": messages}
    if request.get("tools"):
        body["tools"] = request["tools"]
    return body


def _set_prompt(record: BackendRecord, request: Mapping[str, Any] | None, at: str) -> None:
    if not request or record.prompt_ids is not None:
        return
    if isinstance(request.get("messages"), list):
        record.request = _chat_request(request)
    elif isinstance(request.get("prompt"), str):
        record.prompt_text = request["prompt"]
    elif isinstance(request.get("prompt"), list):
        record.prompt_ids = _ids(request["prompt"], f"{at}: request.prompt")


# -- the readers


def _read_openai(response: dict[str, Any], request: dict[str, Any] | None, where: str) -> list[BackendRecord]:
    """OpenAI chat completions (choices[].logprobs.content[]) or legacy completions (choices[].logprobs.tokens),
    as OpenAI, vLLM's server and llama.cpp's OpenAI endpoints write them (vLLM's prompt_token_ids,
    prompt_logprobs and choices[].token_ids extensions included)."""
    choices = _get(response, "choices", list, where)
    prompt_ids = response.get("prompt_token_ids")
    prompt_ids = None if prompt_ids is None else _ids(prompt_ids, f"{where}: prompt_token_ids")
    prompt_lp = _prompt_logprobs(response.get("prompt_logprobs"), prompt_ids, f"{where}: prompt_logprobs")
    records = []
    for i, choice in enumerate(choices):
        at = f"{where}: choices[{i}]"
        logprobs = _get(choice, "logprobs", dict, at, optional=True)
        if logprobs is None:
            raise BackendFileError(f"{at}: has no logprobs; ask for them (chat: \"logprobs\": true, "
                                   "\"top_logprobs\": N; completions: \"logprobs\": N)")
        if "content" in logprobs:
            tokens, is_prob = _chat_tokens(logprobs, f"{at}.logprobs")
        else:
            tokens, is_prob = _legacy_tokens(logprobs, f"{at}.logprobs"), False
        ids = choice.get("token_ids")
        if ids is not None:
            _attach_ids(tokens, _ids(ids, f"{at}.token_ids"), f"{at}.token_ids")
        message = choice.get("message")
        text = message.get("content") if isinstance(message, dict) else choice.get("text")
        record = BackendRecord(f"{where}" + (f" choice {i}" if len(choices) > 1 else ""), tokens,
                               prompt_ids=prompt_ids, text=text if isinstance(text, str) else None,
                               prompt_tokens=prompt_lp, logprobs_of="final" if is_prob else "raw")
        _set_prompt(record, request, where)
        record.params = _openai_params(request, record.notes)
        records.append(record)
    return records


def _chat_tokens(logprobs: dict[str, Any], at: str) -> tuple[list[BackendToken], bool]:
    content = _get(logprobs, "content", list, at)
    tokens, probs = [], set()
    for j, entry in enumerate(content):
        token, is_prob = _entry_token(entry, f"{at}.content[{j}]")
        tokens.append(token)
        probs.add(is_prob)
    return tokens, probs == {True}


def _legacy_tokens(logprobs: dict[str, Any], at: str) -> list[BackendToken]:
    texts = _get(logprobs, "tokens", list, at)
    values = _get(logprobs, "token_logprobs", list, at)
    tops = logprobs.get("top_logprobs") or [None] * len(texts)
    if not (len(texts) == len(values) == len(tops)):
        raise BackendFileError(f"{at}: tokens, token_logprobs and top_logprobs have different lengths "
                               f"({len(texts)}, {len(values)}, {len(tops)})")
    tokens = []
    for j, (text, value, top) in enumerate(zip(texts, values, tops)):
        if not isinstance(text, str):
            raise BackendFileError(f"{at}.tokens[{j}]: expected a string")
        alts = [] if top is None else [Alternative(_number(v, f"{at}.top_logprobs[{j}][{k!r}]"), text=k)
                                       for k, v in _object(top, f"{at}.top_logprobs[{j}]").items()]
        lp = None if value is None else _number(value, f"{at}.token_logprobs[{j}]")
        tokens.append(BackendToken(lp, text=text, top=sorted(alts, key=lambda a: -a.logprob)))
    return tokens


def _attach_ids(tokens: list[BackendToken], ids: list[int], at: str) -> None:
    if len(ids) != len(tokens):
        raise BackendFileError(f"{at}: {len(ids)} token ids for {len(tokens)} logprob entries")
    for token, i in zip(tokens, ids):
        token.id = i


def _read_vllm(response: dict[str, Any], request: dict[str, Any] | None, where: str) -> list[BackendRecord]:
    """vLLM's offline RequestOutput as JSON: prompt_token_ids, prompt_logprobs, outputs[].token_ids and
    outputs[].logprobs (a list of {token id: {logprob, rank, decoded_token}}); its server output is OpenAI's."""
    if "choices" in response:
        return _read_openai(response, request, where)
    outputs = _get(response, "outputs", list, where)
    prompt_ids = response.get("prompt_token_ids")
    prompt_ids = None if prompt_ids is None else _ids(prompt_ids, f"{where}: prompt_token_ids")
    prompt_lp = _prompt_logprobs(response.get("prompt_logprobs"), prompt_ids, f"{where}: prompt_logprobs")
    settings = request or response.get("sampling_params") or response.get("params")
    records = []
    for i, out in enumerate(outputs):
        at = f"{where}: outputs[{i}]"
        ids = _ids(_get(out, "token_ids", list, at), f"{at}.token_ids")
        logprobs = _get(out, "logprobs", list, at, optional=True)
        if logprobs is None:
            raise BackendFileError(f"{at}: has no logprobs; pass SamplingParams(logprobs=N)")
        if len(logprobs) != len(ids):
            raise BackendFileError(f"{at}: {len(logprobs)} logprobs entries for {len(ids)} token ids")
        tokens = [_vllm_position(lp, t, f"{at}.logprobs[{j}]") for j, (lp, t) in enumerate(zip(logprobs, ids))]
        text = out.get("text")
        record = BackendRecord(f"{where}" + (f" output {i}" if len(outputs) > 1 else ""), tokens,
                               prompt_ids=prompt_ids, text=text if isinstance(text, str) else None,
                               prompt_tokens=prompt_lp)
        if prompt_ids is None and isinstance(response.get("prompt"), str):
            record.prompt_text = response["prompt"]
        _set_prompt(record, request, where)
        record.params = _openai_params(settings, record.notes)
        records.append(record)
    return records


_LLAMA_BYTE = re.compile(r"^byte: \\x([0-9a-fA-F]{2})$")


def _read_llama_cpp(response: dict[str, Any], request: dict[str, Any] | None, where: str) -> list[BackendRecord]:
    """llama.cpp server /completion with n_probs: completion_probabilities in the newer shape
    ({id, token, bytes, logprob, top_logprobs}, or prob/top_probs with post_sampling_probs) or the older one
    ({content, probs: [{tok_str, prob}]}, post-sampling probabilities). Its OpenAI endpoints are "openai"."""
    if "choices" in response:
        return _read_openai(response, request, where)
    probs = _get(response, "completion_probabilities", list, where)
    at = f"{where}: completion_probabilities"
    old = bool(probs) and isinstance(probs[0], dict) and "probs" in probs[0]
    if old:
        tokens, is_prob = [_llama_old_token(p, f"{at}[{j}]") for j, p in enumerate(probs)], True
    else:
        parsed = [_entry_token(p, f"{at}[{j}]") for j, p in enumerate(probs)]
        tokens, is_prob = [t for t, _ in parsed], bool(parsed) and all(p for _, p in parsed)
    ids = response.get("tokens")
    if ids:
        _attach_ids(tokens, _ids(ids, f"{where}: tokens"), f"{where}: tokens")
    record = BackendRecord(where, tokens, text=response.get("content") if isinstance(response.get("content"), str)
                           else None, logprobs_of="final" if is_prob else "raw")
    _set_prompt(record, request, where)
    if record.prompt_ids is None and record.prompt_text is None and isinstance(response.get("prompt"), str):
        record.prompt_text = response["prompt"]
    settings = response.get("generation_settings")
    record.params = _llama_cpp_params(settings if isinstance(settings, dict) else request, record.notes)
    return [record]


def _llama_old_token(entry: Any, at: str) -> BackendToken:
    content = _get(entry, "content", str, at)
    alts = []
    for k, p in enumerate(_get(entry, "probs", list, at)):
        text = _get(p, "tok_str", str, f"{at}.probs[{k}]")
        prob = _number(_get(p, "prob", (int, float), f"{at}.probs[{k}]"), f"{at}.probs[{k}].prob")
        alts.append(Alternative(math.log(prob) if prob > 0 else -math.inf, text=text))
    chosen = next((a.logprob for a in alts if a.text == content), None)
    return BackendToken(chosen, text=content, top=alts)


def _read_tgi(response: dict[str, Any], request: dict[str, Any] | None, where: str) -> list[BackendRecord]:
    """TGI's /generate with "details": true (and "top_n_tokens": N, "decoder_input_details": true for the
    prompt): details.tokens[] {id, text, logprob}, details.top_tokens[][], details.prefill[]. TGI's OpenAI
    route (/v1/chat/completions) is "openai"."""
    if "choices" in response:
        return _read_openai(response, request, where)
    details = _get(response, "details", dict, where)
    at = f"{where}: details"
    entries = _get(details, "tokens", list, at)
    tops = details.get("top_tokens") or [[] for _ in entries]
    if len(tops) != len(entries):
        raise BackendFileError(f"{at}: {len(tops)} top_tokens lists for {len(entries)} tokens")
    tokens = [_tgi_token(e, t, f"{at}.tokens[{j}]") for j, (e, t) in enumerate(zip(entries, tops))]
    record = BackendRecord(where, tokens, text=response.get("generated_text")
                           if isinstance(response.get("generated_text"), str) else None)
    prefill = details.get("prefill")
    if prefill:
        record.prompt_ids = [_token_id(_get(p, "id", int, f"{at}.prefill[{i}]"), f"{at}.prefill[{i}].id")
                             for i, p in enumerate(prefill)]
        record.prompt_tokens = [None if p.get("logprob") is None else _tgi_token(p, [], f"{at}.prefill[{i}]")
                                for i, p in enumerate(prefill)]
    _set_prompt(record, request, where)
    if record.prompt_ids is None and isinstance((request or {}).get("inputs"), str):
        record.prompt_text = request["inputs"]
    params = dict((request or {}).get("parameters") or {})
    if params.get("temperature") is None:
        params["temperature"] = 1.0 if params.get("do_sample") else 0  # TGI's defaults
    record.params = _openai_params(params, record.notes)
    return [record]


def _tgi_token(entry: Any, top: Any, at: str) -> BackendToken:
    if not isinstance(top, list):
        raise BackendFileError(f"{at}: top_tokens: expected a list")
    alts = [Alternative(_number(_get(t, "logprob", (int, float), at), at), _token_id(_get(t, "id", int, at), at),
                        t.get("text")) for t in top]
    return BackendToken(_number(_get(entry, "logprob", (int, float), at), f"{at}.logprob"),
                        _token_id(_get(entry, "id", int, at), f"{at}.id"), entry.get("text"), top=alts)


def _read_jsonl(obj: dict[str, Any], request: dict[str, Any] | None, where: str) -> list[BackendRecord]:
    """The plain format: {"prompt_ids" (or "prompt" raw text, or "request" a Workers AI body), "token_ids",
    "logprobs", "top_logprobs": [[[id, logprob], ...], ...], "params": {...}}; optional "final_logprobs"
    (under the backend's final distribution), "logprobs_of" ("raw" or "final"), "prompt_logprobs" and
    "prompt_top_logprobs" (aligned with the prompt, null first), "text"."""
    ids = _ids(_get(obj, "token_ids", list, where), f"{where}: token_ids")
    n = len(ids)
    logprobs = _aligned(obj, "logprobs", n, where)
    tops = _aligned(obj, "top_logprobs", n, where)
    finals = _aligned(obj, "final_logprobs", n, where)
    tokens = [BackendToken(_maybe_number(logprobs[j], f"{where}: logprobs[{j}]"), ids[j],
                           top=_pairs(tops[j], f"{where}: top_logprobs[{j}]"),
                           final_logprob=_maybe_number(finals[j], f"{where}: final_logprobs[{j}]"))
              for j in range(n)]
    record = BackendRecord(where, tokens, text=obj.get("text") if isinstance(obj.get("text"), str) else None)
    if obj.get("prompt_ids") is not None:
        record.prompt_ids = _ids(obj["prompt_ids"], f"{where}: prompt_ids")
    elif isinstance(obj.get("request"), dict):
        record.request = obj["request"]
    elif isinstance(obj.get("prompt"), str):
        record.prompt_text = obj["prompt"]
    record.prompt_tokens = _jsonl_prompt(obj, record.prompt_ids, where)
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
            fields = _without_max_tokens(_object(params, f"{where}: params"))
            record.params = _without_max_tokens(SamplingParams.from_dict(fields).to_dict())
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
        out.append(Alternative(_number(pair[1], f"{at}[{k}][1]"), _token_id(pair[0], f"{at}[{k}][0]")))
    return out


def _jsonl_prompt(obj: dict[str, Any], prompt_ids: list[int] | None, where: str) -> list[BackendToken | None] | None:
    values = obj.get("prompt_logprobs")
    if values is None:
        return None
    if prompt_ids is None or not isinstance(values, list) or len(values) != len(prompt_ids):
        raise BackendFileError(f"{where}: prompt_logprobs needs prompt_ids and one entry per prompt token")
    tops = _aligned(obj, "prompt_top_logprobs", len(prompt_ids), where)
    return [None if v is None else BackendToken(_number(v, f"{where}: prompt_logprobs[{i}]"), prompt_ids[i],
                                                top=_pairs(tops[i], f"{where}: prompt_top_logprobs[{i}]"))
            for i, v in enumerate(values)]


_READERS: dict[str, Callable[[dict[str, Any], dict[str, Any] | None, str], list[BackendRecord]]] = {
    "openai": _read_openai, "vllm": _read_vllm, "llama.cpp": _read_llama_cpp, "tgi": _read_tgi, "jsonl": _read_jsonl,
}


def detect_format(obj: Mapping[str, Any]) -> str | None:
    if "choices" in obj:
        return "openai"
    if "outputs" in obj:
        return "vllm"
    if "completion_probabilities" in obj:
        return "llama.cpp"
    if isinstance(obj.get("details"), dict) and "tokens" in obj["details"]:
        return "tgi"
    if "token_ids" in obj:
        return "jsonl"
    return None


def read_backend_object(obj: Any, where: str, format: str = "auto") -> list[BackendRecord]:
    """The generations in one object of a backend file. {"request": ..., "response": ...} pairs a response with
    the request that produced it (the prompt and the sampling parameters come from the request)."""
    if format not in FORMATS:
        raise BackendFileError(f"format: {format!r} is not one of {', '.join(FORMATS)}")
    if not isinstance(obj, dict):
        raise BackendFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    request = None
    if "response" in obj and isinstance(obj["response"], dict):
        request, obj = obj.get("request"), obj["response"]
        if request is not None and not isinstance(request, dict):
            raise BackendFileError(f"{where}: request: expected a JSON object")
    fmt = detect_format(obj) if format == "auto" else format
    if fmt is None:
        raise BackendFileError(f"{where}: not a format this reads (openai: choices[]; vllm: outputs[]; llama.cpp: "
                               f"completion_probabilities; tgi: details.tokens; jsonl: token_ids); keys: "
                               f"{', '.join(list(obj)[:8])}")
    return _READERS[fmt](obj, request, where)


def read_backend_file(path: str | Path, format: str = "auto") -> list[BackendRecord]:
    """Every generation in a backend file: JSONL (one response per line), a JSON array, or one JSON document."""
    records = []
    for where, obj in _json_objects(Path(path), BackendFileError):
        records.extend(read_backend_object(obj, where, format))
    if not records:
        raise BackendFileError(f"{path}: no generations in the file")
    return records


# ----------------------------------------------------------------------------------------------------------
# Mapping a backend's tokens to our ids


@dataclass(frozen=True)
class Mapped:
    id: int | None
    via: str  # "id", "bytes", "text", "split" (recovered from the output text); or why it is unmapped


def _shown(data: bytes) -> str:
    # how a backend shows a token's bytes as text: invalid UTF-8 becomes U+FFFD (runs collapsed, as backends
    # differ in how many they write per invalid sequence)
    return re.sub("\ufffd+", "\ufffd", data.decode("utf-8", errors="replace"))


def _escaped_bytes(text: str) -> bytes | None:
    """OpenAI writes a token that is not valid UTF-8 as "bytes:\\xe4\\xbd"; old llama.cpp as "byte: \\xe4"."""
    m = _LLAMA_BYTE.match(text)
    if m:
        return bytes([int(m.group(1), 16)])
    if text.startswith("bytes:"):
        try:
            return codecs.escape_decode(text[6:].encode("latin-1"))[0]
        except (ValueError, UnicodeEncodeError):
            return None
    return None


class TokenMap:
    """Backend tokens to our ids: an id when the backend gives one; else its bytes (when they are real bytes:
    vLLM writes the UTF-8 of its U+FFFD text there); else its text, which names exactly one token when it is
    valid UTF-8 (the vocabulary's byte strings are distinct). A token holding part of a UTF-8 character shows
    as U+FFFD: a run of such tokens is recovered from the whole output text when exactly one split of the
    bytes between its neighbours into vocabulary tokens matches what each token shows; else it is unmapped."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size

    @cached_property
    def by_bytes(self) -> dict[bytes, int]:
        table: dict[bytes, int] = {}
        for i in range(self.tokenizer.vocab_size):
            table.setdefault(self.tokenizer.token_bytes(i), i)
        table.pop(b"", None)
        return table

    def one(self, token: BackendToken | Alternative) -> Mapped:
        if token.id is not None:
            if token.id >= self.vocab_size:
                return Mapped(None, f"id {token.id} is outside the model's vocabulary of {self.vocab_size}")
            return Mapped(token.id, "id")
        text = token.text
        if text is not None and text.startswith("token_id:") and text[9:].isdigit():  # vLLM's token ids as text
            return self.one(Alternative(0.0, int(text[9:])))
        if token.bytes is not None and b"\xef\xbf\xbd" not in token.bytes:
            found = self.by_bytes.get(token.bytes)
            return Mapped(found, "bytes") if found is not None else Mapped(None, f"no token has bytes {token.bytes!r}")
        if token.bytes is not None and token.bytes in self.by_bytes and text is None:
            return Mapped(self.by_bytes[token.bytes], "bytes")
        if text is None:
            return Mapped(None, "the backend gives neither id, bytes nor text")
        escaped = _escaped_bytes(text)
        if escaped is not None and escaped in self.by_bytes:
            return Mapped(self.by_bytes[escaped], "bytes")
        if "\ufffd" in text or text == "":
            return Mapped(None, f"fragment: {text!r} is part of a UTF-8 character")
        found = self.by_bytes.get(text.encode("utf-8"))
        return Mapped(found, "text") if found is not None else Mapped(None, f"no token is the text {text!r}")

    def resolve(self, tokens: Sequence[BackendToken], output_text: str | None) -> list[Mapped]:
        mapped = [self.one(t) for t in tokens]
        if output_text is not None and any(m.id is None and m.via.startswith("fragment") for m in mapped):
            self._recover_fragments(tokens, mapped, output_text.encode("utf-8"))
        return mapped

    def _recover_fragments(self, tokens: Sequence[BackendToken], mapped: list[Mapped], full: bytes) -> None:
        offset, i = 0, 0
        special = self.tokenizer.special_ids
        while i < len(mapped):
            if mapped[i].id is not None:
                if mapped[i].id not in special:  # special tokens are not in the output text
                    data = self.tokenizer.token_bytes(mapped[i].id)
                    if not full.startswith(data, offset):
                        return  # the text does not line up with the tokens (a stop string trimmed?)
                    offset += len(data)
                i += 1
                continue
            j = i
            while j < len(mapped) and mapped[j].id is None and mapped[j].via.startswith("fragment"):
                j += 1
            if j == i:
                return
            anchor = self.tokenizer.token_bytes(mapped[j].id) if j < len(mapped) and mapped[j].id is not None else None
            shown = [_shown((t.text or "").encode("utf-8")) for t in tokens[i:j]]
            fits = self._fits(full, offset, shown, anchor, j == len(mapped))
            if len(fits) != 1:
                why = "no split" if not fits else "more than one split"
                mapped[i] = Mapped(None, f"fragment run of {j - i} token(s): {why} of the output text matches")
                return
            ids, length = fits[0]
            mapped[i:j] = [Mapped(t, "split") for t in ids]
            offset += length
            i = j

    def _fits(self, full: bytes, offset: int, shown: list[str], anchor: bytes | None,
              at_end: bool) -> list[tuple[list[int], int]]:
        fits: list[tuple[list[int], int]] = []
        for length in range(len(shown), min(16 * len(shown), len(full) - offset) + 1):
            if anchor is not None and not full.startswith(anchor, offset + length):
                continue
            if anchor is None and at_end and offset + length != len(full):
                continue
            for ids in self._splits(full[offset:offset + length], shown):
                fits.append((ids, length))
                if len(fits) > 1:
                    return fits
        return fits

    def _splits(self, data: bytes, shown: list[str]) -> Iterator[list[int]]:
        if not shown:
            if not data:
                yield []
            return
        for cut in range(1, min(16, len(data)) + 1):
            piece = data[:cut]
            token = self.by_bytes.get(piece)
            if token is not None and (shown[0] in ("", _shown(piece))):
                for rest in self._splits(data[cut:], shown[1:]):
                    yield [token, *rest]


# ----------------------------------------------------------------------------------------------------------
# The reference at each position


def _check_ready(qwen: Qwen) -> None:
    if qwen.tokenizer is None:
        raise QwenRefError(f"the checkpoint {qwen.path} has no tokenizer files; score and compare need them")


@torch.inference_mode()
def next_token_logits(qwen: Qwen, ids: Sequence[int], first: int, chunk: int = CHUNK) -> Iterator[Tensor]:
    """The logits [V] that predict ids[i], for i = first .. len(ids) - 1: the prefix is prefilled once, then the
    rest goes through the KV cache `chunk` tokens per forward (bounding the logits held at once)."""
    if not 1 <= first < len(ids):
        return
    device = qwen.device
    cache = KVCache(qwen.model.config, 1, len(ids), dtype=qwen.dtype, device=device)
    yield qwen.model(torch.tensor([list(ids[:first])], device=device), cache=cache, last_only=True)[0, 0]
    for start in range(first, len(ids) - 1, chunk):
        piece = list(ids[start:min(start + chunk, len(ids) - 1)])
        yield from qwen.model(torch.tensor([piece], device=device), cache=cache)[0]


def raw_logprobs(logits: Tensor) -> Tensor:
    return torch.log_softmax(logits.to(torch.float64), dim=-1)  # numerics: widening is exact; log-softmax in float64


def _top(values: Tensor, n: int) -> list[tuple[int, float]]:
    """The n best (id, value), value descending, ties by lower id; -inf entries are left out."""
    if n <= 0:
        return []
    best, ids = torch.topk(values, min(n + 1, values.shape[-1]))
    if len(best) > n and best[n] == best[n - 1]:  # a tie at the n-th: every tied id competes for the last places
        ids = torch.nonzero(values >= best[n - 1]).flatten()
    picked = sorted(zip(ids.tolist(), values[ids].tolist()), key=lambda p: (-p[1], p[0]))[:n]
    return [(i, v) for i, v in picked if v > -math.inf]


def _rank(values: Tensor, token: int) -> int:
    return 1 + int((values > values[token]).sum())


def _log(p: float) -> float:
    return math.log(p) if p > 0 else -math.inf


def _finite(x: float | None) -> float | None:
    # JSON has no infinities: -inf logprobs (probability exactly 0) are written as null
    return x if x is None or math.isfinite(x) else None


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
    from qwen_ref.workers_ai.generate import prompt_text

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
    _check_ready(qwen)
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
                       **_token_text(tok, token), "logprob": _finite(float(lp[token])), "rank": _rank(lp, token),
                       "top": [{"id": i, "text": tok.decode([i]), "logprob": v} for i, v in _top(lp, top_n)]}
            if seq.params is not None:
                p = float(distribution(logits, seq.params, seq.prompt_ids, seq.token_ids[:step])[token])
                record["final_logprob"] = _finite(_log(p))
                record["in_support"] = p > 0
            yield record


# ----------------------------------------------------------------------------------------------------------
# compare: per position


@dataclass
class Position:
    """The comparison at one position. `logprob` is the reference's in the distribution the backend's numbers are
    of (raw, or final with logprobs_of "final"); `rank` and `argmax` are in the raw distribution."""

    record: int
    phase: str  # "prompt" (teacher-forced prompt logprobs) or "output"
    step: int  # index in the output (in the prompt for phase "prompt")
    position: int  # index in the whole sequence
    token: int
    text: str
    via: str
    rank: int
    argmax: int
    backend_logprob: float | None = None
    logprob: float | None = None
    abs_diff: float | None = None
    top_n: int = 0
    kl: float | None = None
    top_max_abs_diff: float | None = None
    top_note: str = ""
    final_logprob: float | None = None
    backend_final_logprob: float | None = None
    final_abs_diff: float | None = None
    in_support: bool | None = None
    support: str = ""
    greedy_token: int | None = None
    greedy_margin: float | None = None
    flags: list[str] = field(default_factory=list)
    why: list[str] = field(default_factory=list)

    def flag(self, name: str, why: str) -> None:
        self.flags.append(name)
        self.why.append(why)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in self.__dict__.items():
            if value is None or value == "" or (value == [] and key not in ("flags",)):
                continue
            out[key] = _finite(value) if isinstance(value, float) else value
        return out


@dataclass
class _Context:
    thresholds: Thresholds
    record: int
    kind: str  # which distribution the backend's logprobs are of: "raw" or "final"
    params: SamplingParams | None
    prompt_ids: list[int]


def _logprob_diff(backend: float, ours: float) -> float:
    if backend <= LOG_FLOOR and ours <= FLOAT32_EXP_UNDERFLOW:
        return 0.0  # the backend's "log(0)" (clamped or -FLT_MAX) for a token we give no float32 probability
    if math.isinf(backend) or math.isinf(ours):
        return 0.0 if backend == ours else math.inf
    return abs(backend - ours)


def _top_agreement(ours: Tensor, alts: list[tuple[int, float]], n: int) -> tuple[float | None, float | None, str]:
    """KL(reference || backend) over the ids in both top-N lists (each renormalised there), the largest
    |difference| over the backend's top-N, and a note when the two top-N sets differ."""
    if not alts:
        return None, None, ""
    ref_top = {i for i, _ in _top(ours, n)}
    theirs = {i for i, _ in alts}
    diffs = [_logprob_diff(lp, float(ours[i])) for i, lp in alts]
    shared = [(i, lp) for i, lp in alts if i in ref_top and lp > LOG_FLOOR and float(ours[i]) > -math.inf]
    kl = None
    if len(shared) >= 2:
        # float64 throughout: both sides renormalised over the shared ids
        b = torch.log_softmax(torch.tensor([lp for _, lp in shared], dtype=torch.float64), 0)
        r = torch.log_softmax(ours[[i for i, _ in shared]].to(torch.float64), 0)
        kl = max(0.0, float((r.exp() * (r - b)).sum()))
    note = ""
    if theirs != ref_top:
        note = (f"top-{n} sets differ: backend only {sorted(theirs - ref_top)[:5]}, "
                f"reference only {sorted(ref_top - theirs)[:5]}")
    return kl, max(diffs), note


def _stage2(logits: Tensor, sp: SamplingParams, prompt_ids: Sequence[int], output_ids: Sequence[int]) -> np.ndarray:
    """The logits after the penalties (stages 1-2), in float64 for margins."""
    x = logits[None].cpu()
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()  # numerics: exact widening, as the sampler
    history = History.stack([PenaltyState(prompt_ids, output_ids)])
    column = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    x = apply_repetition_penalty(x, history, column(sp.repetition_penalty or 1.0))
    x = frequency_presence_penalty(x, history, column(sp.frequency_penalty or 0.0), column(sp.presence_penalty or 0.0))
    return x[0].to(torch.float64).numpy()  # numerics: exact widening


def _exclusion(z2: np.ndarray, token: int, sp: SamplingParams) -> tuple[str, float, str]:
    """Why our sampler could not produce `token`, and by how much: (reason, margin, unit) with unit "logit"
    (below the top_k boundary) or "mass" (probability mass past the top_p boundary)."""
    if not np.isfinite(z2[token]):
        return "the penalties remove it (repetition_penalty's r -> 0 limit)", math.inf, "logit"
    finite = np.isfinite(z2)
    kept = finite
    if sp.top_k is not None and sp.top_k < finite.sum():
        kth = float(np.partition(z2[finite], -sp.top_k)[-sp.top_k])  # the k-th largest, counted with ties
        if z2[token] < kth:
            return f"outside top_k={sp.top_k}: {kth - z2[token]:.3g} below the k-th logit", kth - z2[token], "logit"
        kept = finite & (z2 >= kth)
    if sp.top_p is None or sp.top_p >= 1.0:
        return "outside the support", math.inf, "logit"
    ids = np.flatnonzero(kept)
    y = (z2[ids] - z2[ids].max()) / sp.temperature  # float64, as the sampler computes it
    p = np.exp(y) / np.exp(y).sum()
    order = np.lexsort((ids, -p))
    where = int(np.flatnonzero(ids[order] == token)[0])
    above = float(p[order[:where]].sum())
    q = sp.top_p
    return (f"outside top_p={q}: the tokens before it already hold {above:.6f} >= {q} (by {above - q:.3g})",
            above - q, "mass")


def _check_output(ctx: _Context, pos: Position, logits: Tensor, lp: Tensor, bt: BackendToken,
                  alts: list[tuple[int, float]], output_ids: list[int]) -> None:
    sp, thr = ctx.params, ctx.thresholds
    dist = None if sp is None else distribution(logits, sp, ctx.prompt_ids, output_ids)
    if dist is not None:
        p = float(dist[pos.token])
        pos.final_logprob, pos.in_support = _log(p), p > 0
    scale = 1.0 if sp is None or sp.greedy else 1.0 / sp.temperature  # z / T scales logit errors by 1 / T
    if ctx.kind == "raw":
        _compare_logprobs(pos, lp, bt, alts, thr.logprob, thr.kl)
    elif dist is not None:
        _compare_logprobs(pos, torch.log(dist), bt, alts, thr.logprob * scale, thr.kl * scale**2)
    if sp is None:
        return
    if sp.greedy:
        _check_greedy(ctx, pos, logits, output_ids, int(torch.argmax(dist)))
    elif not pos.in_support:
        _check_support(ctx, pos, logits, output_ids, scale)
    elif bt.final_logprob is not None and ctx.kind == "raw":
        pos.backend_final_logprob = bt.final_logprob
        pos.final_abs_diff = _logprob_diff(bt.final_logprob, pos.final_logprob)
        if pos.final_abs_diff > thr.logprob * scale:
            pos.flag("final_logprob", f"final_logprob: |{bt.final_logprob:.6g} - {pos.final_logprob:.6g}| = "
                                      f"{pos.final_abs_diff:.3g} > {thr.logprob * scale:.3g}")


def _check_greedy(ctx: _Context, pos: Position, logits: Tensor, output_ids: list[int], greedy_token: int) -> None:
    pos.greedy_token = greedy_token
    if greedy_token == pos.token:
        return
    z2 = _stage2(logits, ctx.params, ctx.prompt_ids, output_ids)
    pos.greedy_margin = float(z2[greedy_token] - z2[pos.token])
    if pos.greedy_margin > ctx.thresholds.logprob:  # a near tie within the noise is a divergence, not a fault
        pos.flag("greedy", f"greedy: our argmax is {greedy_token}, {pos.greedy_margin:.3g} above the backend's "
                           f"token (tolerance {ctx.thresholds.logprob:g})")


def _check_support(ctx: _Context, pos: Position, logits: Tensor, output_ids: list[int], scale: float) -> None:
    reason, margin, unit = _exclusion(_stage2(logits, ctx.params, ctx.prompt_ids, output_ids), pos.token, ctx.params)
    pos.support = reason
    tolerance = ctx.thresholds.support_logit if unit == "logit" else ctx.thresholds.support_mass * scale
    if margin > tolerance:
        pos.flag("support", f"support: our sampler cannot produce this token: {reason}")


def _compare_logprobs(pos: Position, ours: Tensor, bt: BackendToken | None, alts: list[tuple[int, float]],
                      tolerance: float, kl_tolerance: float) -> None:
    pos.logprob = float(ours[pos.token])
    if bt is not None and bt.logprob is not None:
        pos.backend_logprob = bt.logprob
        pos.abs_diff = _logprob_diff(bt.logprob, pos.logprob)
        if pos.abs_diff > tolerance:
            pos.flag("logprob", f"logprob: |{bt.logprob:.6g} - {pos.logprob:.6g}| = {pos.abs_diff:.3g} > "
                                f"{tolerance:.3g}")
    n = len(bt.top) if bt is not None else 0
    pos.top_n = n
    pos.kl, pos.top_max_abs_diff, pos.top_note = _top_agreement(ours, alts, n)
    if pos.kl is not None and pos.kl > kl_tolerance:
        pos.flag("kl", f"kl: KL over the shared top-{n} = {pos.kl:.3g} > {kl_tolerance:.3g}")


# ----------------------------------------------------------------------------------------------------------
# compare: per record, and the report


@dataclass
class RecordResult:
    index: int
    source: str
    prompt_tokens: int
    tokens: int  # output tokens the backend gave
    positions: list[Position]
    sampler: str  # what was checked of the sampler
    notes: list[str] = field(default_factory=list)
    unmapped: tuple[int, str] | None = None  # (step, why): teacher forcing stops there

    @property
    def compared(self) -> int:
        return sum(p.phase == "output" for p in self.positions)

    @property
    def flagged(self) -> list[Position]:
        return [p for p in self.positions if p.flags]

    @property
    def first_flag(self) -> Position | None:
        return next(iter(self.flagged), None)

    @property
    def greedy_divergence(self) -> Position | None:
        """The first position where greedy decoding would have chosen another token than the backend's."""
        return next((p for p in self.positions if p.greedy_token is not None and p.greedy_token != p.token), None)

    def errors(self) -> list[float]:
        return [p.abs_diff for p in self.positions if p.abs_diff is not None and math.isfinite(p.abs_diff)]


def _prompt_ids(qwen: Qwen, record: BackendRecord) -> list[int]:
    from qwen_ref.workers_ai.generate import prompt_text

    if record.prompt_ids is not None:
        return record.prompt_ids
    try:
        if record.request is not None:
            return qwen.tokenizer.encode(prompt_text(qwen, dict(record.request))[0])
    except QwenRefError as e:
        raise BackendFileError(f"{record.source}: the request cannot be templated: {e}") from None
    if record.prompt_text is not None:
        return qwen.tokenizer.encode(record.prompt_text)
    raise BackendFileError(f"{record.source}: no prompt: give prompt_ids, or wrap the response as "
                           "{\"request\": ..., \"response\": ...} so the prompt can be rebuilt")


_SHORT_NAMES = {"temperature": "T", "top_k": "k", "top_p": "p", "repetition_penalty": "rep",
                "frequency_penalty": "freq", "presence_penalty": "pres"}


def _sampler_summary(sp: SamplingParams | None) -> str:
    if sp is None:
        return "not checked"
    if sp.greedy:
        return "greedy"
    values = sp.to_dict()
    return " ".join(f"{short}={values[k]:g}" for k, short in _SHORT_NAMES.items() if k in values)


def _record_params(record: BackendRecord, default: Mapping[str, Any] | None) -> tuple[SamplingParams | None, list[str]]:
    """The record's sampling parameters, else the default ones (--params), with the notes that still hold."""
    params, notes = record.params, list(record.notes)
    if params is None and default is not None:
        params = dict(default)
        notes = [n for n in notes if "skipped" not in n] + ["sampling parameters from --params"]
    if params is None:
        return None, notes
    try:
        return SamplingParams.from_dict(_without_max_tokens(params)), notes
    except InvalidSamplingParams as e:
        raise BackendFileError(f"{record.source}: params: {e}") from None


def _prompt_phase(record: BackendRecord, prompt: list[int], tmap: TokenMap,
                  notes: list[str]) -> list[BackendToken | None] | None:
    """The backend's prompt logprobs, when it read the same prompt tokens as we do."""
    if not record.prompt_tokens:
        return None
    if len(record.prompt_tokens) != len(prompt):
        notes.append(f"the backend's prompt has {len(record.prompt_tokens)} tokens, ours {len(prompt)} (chat "
                     "template or tokenizer differ?): prompt logprobs not compared")
        return None
    for i, bt in enumerate(record.prompt_tokens):
        if bt is not None and tmap.one(bt).id not in (None, prompt[i]):
            notes.append(f"the backend's prompt differs from ours at position {i} (chat template or tokenizer "
                         "differ?): prompt logprobs not compared")
            return None
    return record.prompt_tokens


def _compare_record(qwen: Qwen, record: BackendRecord, index: int, thr: Thresholds, tmap: TokenMap,
                    default_params: Mapping[str, Any] | None, logprobs_of: str | None, chunk: int) -> RecordResult:
    prompt = _prompt_ids(qwen, record)
    if any(i >= qwen.config.vocab_size for i in prompt):
        raise BackendFileError(f"{record.source}: a prompt token id is outside the model's vocabulary")
    sp, notes = _record_params(record, default_params)
    ctx = _Context(thr, index, logprobs_of or record.logprobs_of, sp, prompt)
    if ctx.kind == "final" and sp is None:
        notes.append("the logprobs are of the backend's final sampling distribution and the parameters are "
                     "unknown: logprobs not compared (give --params)")
    mapped = tmap.resolve(record.tokens, record.text)
    stop = next((j for j, m in enumerate(mapped) if m.id is None), len(mapped))  # teacher forcing ends there
    output = [m.id for m in mapped[:stop] if m.id is not None]
    prompt_tokens = _prompt_phase(record, prompt, tmap, notes)
    ids = prompt + output
    positions: list[Position] = []
    first = 1 if prompt_tokens is not None else len(prompt)
    for at, logits in enumerate(next_token_logits(qwen, ids, first, chunk), start=first):
        lp = raw_logprobs(logits)
        if at < len(prompt):
            bt = prompt_tokens[at] if prompt_tokens is not None else None
            if bt is None:
                continue
            pos = _position(qwen, index, "prompt", at, at, ids[at], "id", lp)
            _compare_logprobs(pos, lp, bt, _alternatives(bt, tmap), thr.logprob, thr.kl)
        else:
            step = at - len(prompt)
            bt = record.tokens[step]
            pos = _position(qwen, index, "output", step, at, ids[at], mapped[step].via, lp)
            _check_output(ctx, pos, logits, lp, bt, _alternatives(bt, tmap), output[:step])
        positions.append(pos)
    unmapped = None if stop == len(mapped) else (stop, mapped[stop].via)
    return RecordResult(index, record.source, len(prompt), len(record.tokens), positions, _sampler_summary(sp),
                        notes, unmapped)


def _position(qwen: Qwen, record: int, phase: str, step: int, at: int, token: int, via: str, lp: Tensor) -> Position:
    return Position(record, phase, step, at, token, qwen.tokenizer.decode([token]), via, _rank(lp, token),
                    int(torch.argmax(lp)))


def _alternatives(bt: BackendToken, tmap: TokenMap) -> list[tuple[int, float]]:
    out = []
    for alt in bt.top:
        mapped = tmap.one(alt)
        if mapped.id is not None and all(mapped.id != i for i, _ in out):
            out.append((mapped.id, alt.logprob))
    return out


@dataclass
class Report:
    records: list[RecordResult]
    thresholds: Thresholds
    reference: str  # the reference checkpoint and dtype
    backend_dtype: str

    @property
    def positions(self) -> list[Position]:
        return [p for r in self.records for p in r.positions]

    @property
    def flagged(self) -> list[Position]:
        return [p for p in self.positions if p.flags]

    @property
    def first_flag(self) -> Position | None:
        return next(iter(self.flagged), None)

    @property
    def unmapped(self) -> list[RecordResult]:
        return [r for r in self.records if r.unmapped is not None]

    @property
    def ok(self) -> bool:
        return not self.flagged and not self.unmapped

    def summary(self) -> dict[str, Any]:
        errors = [e for r in self.records for e in r.errors()]
        kls = [p.kl for p in self.positions if p.kl is not None]
        counts: dict[str, int] = {}
        for p in self.flagged:
            for f in p.flags:
                counts[f] = counts.get(f, 0) + 1
        first = self.first_flag
        return {
            "reference": self.reference, "backend_dtype": self.backend_dtype,
            "thresholds": self.thresholds.__dict__, "records": len(self.records),
            "positions": len(self.positions), "output_positions": sum(r.compared for r in self.records),
            "flagged": len(self.flagged), "flags": counts, "unmapped_records": len(self.unmapped),
            "max_abs_diff": max(errors, default=None), "mean_abs_diff": float(np.mean(errors)) if errors else None,
            "max_kl": max(kls, default=None),
            "first_flag": None if first is None else {
                "record": first.record, "source": self.records[first.record].source, "phase": first.phase,
                "step": first.step, "position": first.position, "token": first.token, "why": first.why},
        }

    def format(self) -> str:
        s = self.summary()
        lines = [f"reference: {self.reference}   backend dtype: {self.backend_dtype} ({self.thresholds.describe()})",
                 f"records: {s['records']}   positions compared: {s['positions']} (output {s['output_positions']})"
                 f"   flagged: {s['flagged']}   unmapped records: {s['unmapped_records']}",
                 f"|dlogprob|: max {_g(s['max_abs_diff'])}, mean {_g(s['mean_abs_diff'])}   "
                 f"KL top-N: max {_g(s['max_kl'])}   flags: "
                 + (", ".join(f"{k} {v}" for k, v in s["flags"].items()) or "none")]
        first = self.first_flag
        if first is not None:
            lines.append(f"first flagged: record {first.record} ({self.records[first.record].source}) "
                         f"{first.phase} step {first.step} (position {first.position}) token {first.token} "
                         f"{first.text!r}: " + "; ".join(first.why))
        for r in self.unmapped:
            lines.append(f"record {r.index} ({r.source}): compared up to step {r.unmapped[0]}, where "
                         f"a token cannot be mapped to our ids: {r.unmapped[1]}")
        lines += ["", f"{'rec':>3}  {'source':<28}{'tokens':>7}{'cmp':>5}{'flag':>5}{'max|d|':>10}{'mean|d|':>10}"
                      f"{'greedy-div':>11}  {'sampler':<30}first flag"]
        for r in self.records:
            errors = r.errors()
            div = r.greedy_divergence
            ff = r.first_flag
            lines.append(f"{r.index:>3}  {r.source[-28:]:<28}{r.tokens:>7}{r.compared:>5}{len(r.flagged):>5}"
                         f"{_g(max(errors, default=None)):>10}{_g(float(np.mean(errors)) if errors else None):>10}"
                         f"{('step ' + str(div.step)) if div else '-':>11}  {r.sampler[:29]:<30}"
                         + (f"{ff.phase} step {ff.step}: {', '.join(ff.flags)}" if ff else "-"))
        notes = [(r.index, n) for r in self.records for n in r.notes]
        if notes:
            lines.append("")
            lines += [f"record {i}: {n}" for i, n in notes]
        return "\n".join(lines)

    def details(self) -> Iterator[dict[str, Any]]:
        for r in self.records:
            for p in r.positions:
                yield {"source": r.source, **p.to_dict()}

    def write_jsonl(self, path: str | Path) -> None:
        with _open_output(path) as f:
            for row in self.details():
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def plot(self, path: str | Path) -> None:
        """|logprob difference| per position, one line per record, with the tolerance and the flags."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise QwenRefError("--plot needs matplotlib: pip install 'qwen-ref[plot]'") from None
        fig, ax = plt.subplots(figsize=(9.0, 4.0))
        floor = self.thresholds.logprob * 1e-4
        for r in self.records:
            pts = [p for p in r.positions if p.phase == "output" and p.abs_diff is not None]
            ax.plot([p.step for p in pts], [max(min(p.abs_diff, 1e3), floor) for p in pts], marker=".",
                    linewidth=0.8, label=f"{r.index}: {r.source[-24:]}")
            bad = [p for p in r.positions if p.phase == "output" and p.flags]
            ax.scatter([p.step for p in bad], [max(min(p.abs_diff or 1e3, 1e3), floor) for p in bad],
                       color="red", zorder=3, s=30)
        ax.axhline(self.thresholds.logprob, color="gray", linestyle="--", label="tolerance")
        ax.set_yscale("log")
        ax.set_xlabel("output step")
        ax.set_ylabel("|logprob difference| (nats)")
        ax.set_title(f"backend vs {self.reference}: red = flagged")
        if len(self.records) <= 12:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def compare(qwen: Qwen, backend_records: Iterable[BackendRecord], *, thresholds: Thresholds | None = None,
            backend_dtype: str | None = None, params: Mapping[str, Any] | None = None,
            logprobs_of: str | None = None, chunk: int = CHUNK) -> Report:
    """Teacher-force every backend generation through the reference and compare position by position.
    `backend_dtype` picks the default thresholds (default: the checkpoint's torch_dtype, what a backend
    runs by default); `params` are sampling fields for records that carry none; `logprobs_of` ("raw" or
    "final") overrides which distribution the backend's logprobs are taken to be of."""
    _check_ready(qwen)
    if logprobs_of not in (None, "raw", "final"):
        raise QwenRefError(f"logprobs_of: {logprobs_of!r} is not 'raw' or 'final'")
    backend = backend_dtype or qwen.config.torch_dtype or "float32"
    thr = thresholds or Thresholds.for_dtypes(backend, dtype_name(qwen.dtype))
    tmap = TokenMap(qwen.tokenizer, qwen.config.vocab_size)
    results = [_compare_record(qwen, rec, i, thr, tmap, params, logprobs_of, chunk)
               for i, rec in enumerate(backend_records)]
    return Report(results, thr, f"{qwen.path} {dtype_name(qwen.dtype)}", backend)


# ----------------------------------------------------------------------------------------------------------
# A "backend" file from transformers: the smoke test of the whole tool


def transformers_processors(params: SamplingParams) -> Any:
    """transformers' own processors for our parameters, in the spec's order (penalty, temperature, top_k,
    top_p). frequency and presence penalties have no transformers processor."""
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    if params.frequency_penalty or params.presence_penalty:
        raise QwenRefError("transformers has no frequency/presence penalty processor; leave them out")
    out = LogitsProcessorList()
    if params.repetition_penalty not in (None, 1.0):
        out.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.greedy:
        return out
    if params.temperature != 1.0:
        out.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k is not None:
        out.append(TopKLogitsWarper(params.top_k))
    if params.top_p is not None and params.top_p < 1.0:
        out.append(TopPLogitsWarper(params.top_p))
    return out


def _hf_top(logprobs: Tensor, n: int) -> list[list[float | int]]:
    values, ids = torch.topk(logprobs, n)
    return [[int(i), float(v)] for i, v in zip(ids.tolist(), values.tolist()) if v > -math.inf]


@torch.inference_mode()
def _hf_generate(model: Any, prompt: list[int], sp: SamplingParams, processors: Any, *, max_new_tokens: int,
                 top_n: int, eos: set[int], seed: int, prompt_logprobs: bool, final_logprobs: bool) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor([prompt])
    out = model(input_ids=ids, use_cache=True)
    record: dict[str, Any] = {"prompt_ids": prompt, "token_ids": [], "logprobs": [], "top_logprobs": []}
    if prompt_logprobs:
        lp = torch.log_softmax(out.logits[0, :-1].float(), dim=-1)  # float32, as a serving backend computes them
        record["prompt_logprobs"] = [None] + [float(lp[i, t]) for i, t in enumerate(prompt[1:])]
        record["prompt_top_logprobs"] = [None] + [_hf_top(lp[i], top_n) for i in range(len(prompt) - 1)]
    finals = []
    for _ in range(max_new_tokens):
        logits = out.logits[0, -1].float()
        scores = processors(ids, logits[None].clone())[0]
        if sp.greedy:
            token = int(torch.argmax(scores))
        else:
            token = int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator))
        lp = torch.log_softmax(logits, dim=-1)
        record["token_ids"].append(token)
        record["logprobs"].append(float(lp[token]))
        record["top_logprobs"].append(_hf_top(lp, top_n))
        finals.append(float(torch.log_softmax(scores, dim=-1)[token]))
        if token in eos:
            break
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        out = model(input_ids=ids[:, -1:], past_key_values=out.past_key_values, use_cache=True)
    if final_logprobs and not sp.greedy:
        record["final_logprobs"] = finals
    return record


def make_backend_file_from_transformers(path: str | Path, prompts: Sequence[str | Sequence[int]], *,
                                        checkpoint: str | Path, params: Mapping[str, Any] | Sequence[Mapping[str, Any]]
                                        = ({"temperature": 0},), max_new_tokens: int = 16, top_n: int = 5,
                                        dtype: str = "float32", seed: int = 0, prompt_logprobs: bool = False,
                                        final_logprobs: bool = True, model: Any = None,
                                        processors: Callable[[SamplingParams], Any] | None = None) -> Path:
    """Write a "backend" JSONL (the plain format) generated by transformers' own model and logits processors:
    one record per prompt (raw text or ids; no chat template), with raw logprobs and top-N, and, for sampled
    records, logprobs under transformers' processed distribution. `params` is one set of sampling fields or one
    per prompt; `model` (a transformers model) and `processors` (SamplingParams -> LogitsProcessorList)
    replace the defaults, which is how tests build faulty backends. Draws use torch.multinomial seeded with
    seed + the prompt's index, so a file is reproducible but not our sampler's draws."""
    from qwen_ref.tokenizer.runtime import load_tokenizer

    checkpoint = Path(checkpoint)
    if model is None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="eager",
                                                     dtype=getattr(torch, dtype)).eval()
    tokenizer = load_tokenizer(checkpoint)
    per_prompt = [params] * len(prompts) if isinstance(params, Mapping) else list(params)
    if len(per_prompt) == 1 and len(prompts) > 1:
        per_prompt = per_prompt * len(prompts)
    if len(per_prompt) != len(prompts):
        raise QwenRefError(f"params: {len(per_prompt)} sets for {len(prompts)} prompts")
    eos = set(_eos_ids(checkpoint))
    with _open_output(path) as f:
        for i, (prompt, p) in enumerate(zip(prompts, per_prompt)):
            ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            sp = SamplingParams.from_dict({k: v for k, v in p.items() if k != "max_tokens"})
            chain = (processors or transformers_processors)(sp)
            record = _hf_generate(model, ids, sp, chain, max_new_tokens=max_new_tokens, top_n=top_n, eos=eos,
                                  seed=seed + i, prompt_logprobs=prompt_logprobs, final_logprobs=final_logprobs)
            record["params"] = {k: v for k, v in sp.to_dict().items() if k != "max_tokens"}
            f.write(json.dumps({"id": f"transformers-{i}", **record}) + "\n")
    return Path(path)


def _eos_ids(checkpoint: Path) -> list[int]:
    for name in ("generation_config.json", "config.json"):
        file = checkpoint / name
        if file.is_file():
            value = json.loads(file.read_text(encoding="utf-8")).get("eos_token_id")
            if value is not None:
                return [value] if isinstance(value, int) else list(value)
    return []


class _open_output:
    """A text file for writing, or stdout for "-"."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)

    def __enter__(self) -> Any:
        if self.path == "-":
            return sys.stdout
        try:
            self.file = open(self.path, "w", encoding="utf-8")
        except OSError as e:
            raise QwenRefError(f"{self.path}: cannot write ({e.strerror})") from None
        return self.file

    def __exit__(self, *exc: object) -> None:
        if self.path != "-":
            self.file.close()


# ----------------------------------------------------------------------------------------------------------
# The command line: qwen-ref score / qwen-ref compare


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    """score's own flags; the reference model's (source, --dtype, ...) are the CLI's shared load flags."""
    parser.add_argument("--input", required=True, metavar="FILE",
                        help="JSONL of sequences ('-' for stdin): {prompt_ids, token_ids}, {prompt, completion}, "
                             "{request, completion}, or {text}; optional params and id")
    parser.add_argument("--output", default="-", metavar="FILE", help="per-position JSONL (default: stdout)")
    parser.add_argument("--top-n", type=int, default=5, help="alternatives per position (default 5)")


def run_score(args: argparse.Namespace, load: Callable[[], Any]) -> int:
    """load() gives the reference model (qwen_ref.Qwen) the shared load flags describe."""
    if args.top_n < 0:
        raise QwenRefError("--top-n must be >= 0")
    qwen = load()
    items = (obj for _, obj in _json_objects(Path(args.input), ScoreInputError))
    with _open_output(args.output) as f:
        for record in score(qwen, items, top_n=args.top_n):
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return 0


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    """compare's own flags; the reference model's (source, --dtype, ...) are the CLI's shared load flags."""
    parser.add_argument("--backend", required=True, metavar="FILE",
                        help="the backend's generations with per-token logprobs (JSONL, a JSON array or one JSON "
                             "object); {\"request\": ..., \"response\": ...} lines carry the request")
    parser.add_argument("--format", choices=FORMATS, default="auto", help="default: detected per line")
    parser.add_argument("--output", metavar="FILE", help="per-position details as JSONL")
    parser.add_argument("--plot", metavar="PNG", help="plot the per-position error (needs matplotlib)")
    parser.add_argument("--backend-dtype", choices=list(LOGPROB_TOLERANCE), default=None,
                        help="the dtype the backend computed in; picks the tolerances (default: the checkpoint's)")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="|logprob difference| tolerance; the others derive from it (overrides --backend-dtype)")
    parser.add_argument("--params", metavar="JSON", default=None,
                        help="sampling fields for generations that carry none, e.g. '{\"temperature\": 0}'")
    parser.add_argument("--logprobs-of", choices=["raw", "final"], default=None,
                        help="which distribution the backend's logprobs are of (default: from the format)")


def run_compare(args: argparse.Namespace, load: Callable[[], Any]) -> int:
    """Prints the summary; exit status 0 when nothing is flagged, 1 when something is. load() gives the
    reference model (qwen_ref.Qwen) the shared load flags describe."""
    params = None
    if args.params is not None:
        try:
            params = json.loads(args.params)
        except json.JSONDecodeError as e:
            raise QwenRefError(f"--params: not valid JSON ({e.msg})") from None
        if not isinstance(params, dict):
            raise QwenRefError("--params: expected a JSON object of sampling fields")
    if args.tolerance is not None and not args.tolerance > 0:
        raise QwenRefError("--tolerance must be > 0")
    records = read_backend_file(args.backend, args.format)
    qwen = load()
    thresholds = None if args.tolerance is None else Thresholds.from_logprob(args.tolerance)
    report = compare(qwen, records, thresholds=thresholds, backend_dtype=args.backend_dtype, params=params,
                     logprobs_of=args.logprobs_of)
    print(report.format())
    if args.output:
        report.write_jsonl(args.output)
    if args.plot:
        report.plot(args.plot)
    return 0 if report.ok else 1


__all__ = [
    "FORMATS",
    "LOGPROB_TOLERANCE",
    "Alternative",
    "BackendFileError",
    "BackendRecord",
    "BackendToken",
    "Mapped",
    "OracleFileError",
    "Position",
    "RecordResult",
    "Report",
    "ScoreInputError",
    "Thresholds",
    "TokenMap",
    "add_compare_arguments",
    "add_score_arguments",
    "compare",
    "detect_format",
    "make_backend_file_from_transformers",
    "next_token_logits",
    "raw_logprobs",
    "read_backend_file",
    "read_backend_object",
    "run_compare",
    "run_score",
    "score",
    "transformers_processors",
]
