"""compare: teacher-force a backend's generations through the reference and check them position by position:
its logprobs and top-N (`logprob`, `kl`), its greedy choices (`greedy`), and whether our sampler could have
produced its sampled tokens (`support`, `final_logprob`). docs/oracle.md, "Running compare", says what each
check means; thresholds.py how much disagreement each tolerates.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from qwen_ref.dtypes import dtype_name
from qwen_ref.errors import InvalidSamplingParams, QwenRefError
from qwen_ref.oracle.files import BackendFileError
from qwen_ref.oracle.formats.params import without_max_tokens
from qwen_ref.oracle.formats.records import BackendRecord, BackendToken
from qwen_ref.oracle.report import Position, RecordResult, Report
from qwen_ref.oracle.score import CHUNK, check_ready, log_or_inf, next_token_logits, rank, raw_logprobs, top
from qwen_ref.oracle.support import exclusion, greedy_margin
from qwen_ref.oracle.thresholds import Thresholds
from qwen_ref.oracle.token_map import TokenMap
from qwen_ref.qwen import Qwen
from qwen_ref.sampling import SamplingParams, distribution
from qwen_ref.workers_ai.request import prompt_text

LOG_FLOOR = -9999.0  # vLLM's OpenAI server clamps logprobs here; llama.cpp writes log(0) as -FLT_MAX
FLOAT32_EXP_UNDERFLOW = -87.0  # a float32 softmax gives exactly 0 (a backend's log(0)) below about this logprob


@dataclass
class _Context:
    """What every output position of one record is checked with."""

    thresholds: Thresholds
    record: int
    kind: str  # which distribution the backend's logprobs are of: "raw" or "final"
    params: SamplingParams | None
    prompt_ids: list[int]


def compare(qwen: Qwen, backend_records: Iterable[BackendRecord], *, thresholds: Thresholds | None = None,
            backend_dtype: str | None = None, params: Mapping[str, Any] | None = None,
            logprobs_of: str | None = None, chunk: int = CHUNK) -> Report:
    """Teacher-force every backend generation through the reference and compare position by position.
    `backend_dtype` picks the default thresholds (default: the checkpoint's torch_dtype, what a backend
    runs by default); `params` are sampling fields for records that carry none; `logprobs_of` ("raw" or
    "final") overrides which distribution the backend's logprobs are taken to be of."""
    check_ready(qwen)
    if logprobs_of not in (None, "raw", "final"):
        raise QwenRefError(f"logprobs_of: {logprobs_of!r} is not 'raw' or 'final'")
    backend = backend_dtype or dtype_name(qwen.config.torch_dtype)  # None: float32
    thr = thresholds or Thresholds.for_dtypes(backend, dtype_name(qwen.dtype))
    tmap = TokenMap(qwen.tokenizer, qwen.config.vocab_size)
    results = [_compare_record(qwen, rec, i, thr, tmap, params, logprobs_of, chunk)
               for i, rec in enumerate(backend_records)]
    return Report(results, thr, f"{qwen.path} {dtype_name(qwen.dtype)}", backend)


# ----------------------------------------------------------------------------------------------------------
# Per record


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


def _prompt_ids(qwen: Qwen, record: BackendRecord) -> list[int]:
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


def _record_params(record: BackendRecord, default: Mapping[str, Any] | None) -> tuple[SamplingParams | None, list[str]]:
    """The record's sampling parameters, else the default ones (--params), with the notes that still hold."""
    params, notes = record.params, list(record.notes)
    if params is None and default is not None:
        params = dict(default)
        notes = [n for n in notes if "skipped" not in n] + ["sampling parameters from --params"]
    if params is None:
        return None, notes
    try:
        return SamplingParams.from_dict(without_max_tokens(params)), notes
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


def _position(qwen: Qwen, record: int, phase: str, step: int, at: int, token: int, via: str, lp: Tensor) -> Position:
    return Position(record, phase, step, at, token, qwen.tokenizer.decode([token]), via, rank(lp, token),
                    int(torch.argmax(lp)))


def _alternatives(bt: BackendToken, tmap: TokenMap) -> list[tuple[int, float]]:
    out = []
    for alt in bt.top:
        mapped = tmap.one(alt)
        if mapped.id is not None and all(mapped.id != i for i, _ in out):
            out.append((mapped.id, alt.logprob))
    return out


_SHORT_NAMES = {"temperature": "T", "top_k": "k", "top_p": "p", "repetition_penalty": "rep",
                "frequency_penalty": "freq", "presence_penalty": "pres"}


def _sampler_summary(sp: SamplingParams | None) -> str:
    if sp is None:
        return "not checked"
    if sp.greedy:
        return "greedy"
    values = sp.to_dict()
    return " ".join(f"{short}={values[k]:g}" for k, short in _SHORT_NAMES.items() if k in values)


# ----------------------------------------------------------------------------------------------------------
# Per position


def _check_output(ctx: _Context, pos: Position, logits: Tensor, lp: Tensor, bt: BackendToken,
                  alts: list[tuple[int, float]], output_ids: list[int]) -> None:
    sp, thr = ctx.params, ctx.thresholds
    dist = None if sp is None else distribution(logits, sp, ctx.prompt_ids, output_ids)
    if dist is not None:
        p = float(dist[pos.token])
        pos.final_logprob, pos.in_support = log_or_inf(p), p > 0
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


def _logprob_diff(backend: float, ours: float) -> float:
    if backend <= LOG_FLOOR and ours <= FLOAT32_EXP_UNDERFLOW:
        return 0.0  # the backend's "log(0)" (clamped or -FLT_MAX) for a token we give no float32 probability
    if math.isinf(backend) or math.isinf(ours):
        return 0.0 if backend == ours else math.inf
    return abs(backend - ours)


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




def _top_agreement(ours: Tensor, alts: list[tuple[int, float]], n: int) -> tuple[float | None, float | None, str]:
    """KL(reference || backend) over the ids in both top-N lists (each renormalised there), the largest
    |difference| over the backend's top-N, and a note when the two top-N sets differ."""
    if not alts:
        return None, None, ""
    ref_top = {i for i, _ in top(ours, n)}
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


def _check_greedy(ctx: _Context, pos: Position, logits: Tensor, output_ids: list[int], greedy_token: int) -> None:
    pos.greedy_token = greedy_token
    if greedy_token == pos.token:
        return
    pos.greedy_margin = greedy_margin(logits, ctx.params, ctx.prompt_ids, output_ids, greedy_token, pos.token)
    if pos.greedy_margin > ctx.thresholds.logprob:  # a near tie within the noise is a divergence, not a fault
        pos.flag("greedy", f"greedy: our argmax is {greedy_token}, {pos.greedy_margin:.3g} above the backend's "
                           f"token (tolerance {ctx.thresholds.logprob:g})")


def _check_support(ctx: _Context, pos: Position, logits: Tensor, output_ids: list[int], scale: float) -> None:
    reason, margin, unit = exclusion(logits, pos.token, ctx.params, ctx.prompt_ids, output_ids)
    pos.support = reason
    tolerance = ctx.thresholds.support_logit if unit == "logit" else ctx.thresholds.support_mass * scale
    if margin > tolerance:
        pos.flag("support", f"support: our sampler cannot produce this token: {reason}")
