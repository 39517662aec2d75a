"""A trace of one sampling step: the logits and probabilities after every stage, for `qwen-ref inspect`.

The trace recomputes the stages one at a time for display; its final stage is the sampler's own
distribution (final_distribution.py), so what it shows is what the draw uses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from qwen_ref.sampling.final_distribution import row_distributions, stages_0_to_2, widened
from qwen_ref.sampling.params import SamplingParams, as_params
from qwen_ref.sampling.penalties import (
    History,
    PenaltyState,
    frequency_presence_penalty,
    penalty_values,
    repetition_penalty,
)
from qwen_ref.sampling.rng import uniform
from qwen_ref.sampling.sampler import draw_index
from qwen_ref.sampling.stages import NEG_INF, SamplingError, mask_disallowed, sequential_softmax, top_k


@dataclass(frozen=True)
class Candidate:
    id: int
    logit: float
    prob: float


@dataclass(frozen=True)
class StageView:
    """The state after one stage: logits and probabilities over the vocabulary (float64, CPU), the number of
    tokens still possible, the entropy in nats and the best candidates (probability descending, lower id)."""

    name: str
    logits: Tensor
    probs: Tensor
    kept: int
    entropy: float
    top: tuple[Candidate, ...]
    note: str = ""


@dataclass(frozen=True)
class Trace:
    params: SamplingParams
    stages: tuple[StageView, ...]
    token: int | None  # the greedy token, or the drawn token when a seed was given; else None

    def stage(self, name: str) -> StageView:
        return next(s for s in self.stages if s.name == name)

    @property
    def final(self) -> StageView:
        return self.stages[-1]


def trace(logits: Tensor, params: SamplingParams | Mapping[str, object], prompt_ids: Iterable[int] = (),
          output_ids: Iterable[int] = (), top: int = 10, *, allowed: Tensor | None = None,
          seed: int | None = None, step: int = 0) -> Trace:
    """Every stage of one step for 1-D `logits`. The final stage is exactly `distribution(...)`; with a
    seed, `token` is the token that draw (seed, step) picks."""
    sp = as_params(params)
    if logits.dim() != 1:
        raise SamplingError(f"trace: logits must be 1-D [V]; got shape {tuple(logits.shape)}")
    history = History.stack([PenaltyState(prompt_ids, output_ids)])
    row_allowed = None if allowed is None else allowed[None]  # [V] -> [1, V]
    dist = row_distributions(stages_0_to_2(logits[None], [sp], history, row_allowed), [sp])[0]
    final = dist.dense(logits.shape[-1]).numpy()
    x = widened(logits[None])  # [1, V]
    history = history.to(x.device)
    r, f, p = penalty_values([sp], x.device)
    z0 = mask_disallowed(x, row_allowed)
    z1 = repetition_penalty(z0, history, r)
    z2 = frequency_presence_penalty(z1, history, f, p)
    raw, z0, z1, z2 = (t[0].to("cpu", torch.float64).numpy() for t in (x, z0, z1, z2))  # exact, for display
    stages = [_view("raw", raw, sequential_softmax(raw), top)]
    if allowed is not None:
        stages.append(_view("mask", z0, sequential_softmax(z0), top))
    stages.append(_view("repetition_penalty", z1, sequential_softmax(z1), top,
                        _noop(sp.repetition_penalty in (None, 1.0))))
    stages.append(_view("frequency_presence", z2, sequential_softmax(z2), top,
                        _noop(not (sp.frequency_penalty or sp.presence_penalty))))
    if dist.one_hot:
        token = int(dist.ids[0])
        argmax = _masked(z2, final > 0)
        stages.append(_view("temperature", argmax, final, top, f"T=0: greedy, argmax = {token}"))
        stages += [_view(name, argmax, final, top, "skipped (greedy)") for name in ("top_k", "top_p")]
        stages.append(_view("final", argmax, final, top))
        return Trace(sp, tuple(stages), token)
    t = sp.temperature
    finite = np.isfinite(z2)
    with np.errstate(over="ignore"):
        scaled = z2 / t  # the logits as the spec writes them (display only: tiny T may overflow them)
        shifted = _masked((z2 - z2[finite].max()) / t, finite)  # what the probabilities are computed from
    stages.append(_view("temperature", scaled, sequential_softmax(shifted), top, _noop(t == 1.0), finite))
    in_top_k = np.isfinite(top_k(torch.from_numpy(z2)[None], torch.tensor([sp.top_k or 0]))[0].numpy())
    stages.append(_view("top_k", _masked(scaled, in_top_k), sequential_softmax(_masked(shifted, in_top_k)), top,
                        _noop(in_top_k.sum() == finite.sum()), in_top_k))
    in_top_p = np.zeros(len(final), dtype=bool)
    in_top_p[dist.ids] = True
    stages.append(_view("top_p", _masked(scaled, in_top_p), final, top, _noop(in_top_p.sum() == in_top_k.sum()),
                        in_top_p))
    stages.append(_view("final", _masked(scaled, in_top_p), final, top, possible=in_top_p))
    token = None if seed is None else int(dist.ids[draw_index(dist.probs, uniform(seed, step))])
    return Trace(sp, tuple(stages), token)


def _view(name: str, logits: np.ndarray, probs: np.ndarray, top: int, note: str = "",
          possible: np.ndarray | None = None) -> StageView:
    nonzero = probs[probs > 0]
    entropy = float(-(nonzero * np.log(nonzero)).sum()) + 0.0  # + 0.0 turns -0.0 into 0.0
    best = np.lexsort((np.arange(len(probs)), -probs))[: min(top, len(nonzero))]
    kept = int((np.isfinite(logits) if possible is None else possible).sum())
    return StageView(name, torch.from_numpy(logits.copy()), torch.from_numpy(probs.copy()), kept, entropy,
                     tuple(Candidate(int(i), float(logits[i]), float(probs[i])) for i in best), note)


def _masked(values: np.ndarray, keep: np.ndarray) -> np.ndarray:
    return np.where(keep, values, NEG_INF)


def _noop(is_noop: bool) -> str:
    return "no-op" if is_noop else ""


_SHORT = {"raw": "raw", "mask": "mask", "repetition_penalty": "rep", "frequency_presence": "freq/pres",
          "temperature": "temp", "top_k": "top_k", "top_p": "top_p", "final": "final"}


def format_trace(tr: Trace, decode: Callable[[int], str] | None = None) -> str:
    """A fixed-width table: one line per stage, then the best candidates with their probability at each stage."""
    def text(i: int) -> str:
        return repr(decode(i))[:16] if decode is not None else ""

    lines = ["params: " + " ".join(f"{k}={v}" for k, v in tr.params.to_dict().items())]
    if tr.token is not None:
        lines.append(f"token: {tr.token} {text(tr.token)}".rstrip())
    lines.append(f"{'stage':<20}{'kept':>8}{'entropy':>10}  {'top-1':<30}note")
    for s in tr.stages:
        best = s.top[0] if s.top else None
        top1 = f"{best.id} {text(best.id)} p={best.prob:.4f}" if best else ""
        lines.append(f"{s.name:<20}{s.kept:>8}{s.entropy:>10.4f}  {top1:<30}{s.note}".rstrip())
    ids = list(dict.fromkeys([c.id for c in tr.final.top] + [c.id for c in tr.stages[0].top]))
    lines.append("")
    lines.append(f"{'id':>8}  {'token':<16}{'raw logit':>11}" + "".join(f"{_SHORT[s.name]:>11}" for s in tr.stages))
    for i in ids:
        probs = "".join(f"{float(s.probs[i]):>11.6f}" if s.probs[i] > 0 else f"{'-':>11}" for s in tr.stages)
        lines.append(f"{i:>8}  {text(i):<16}{float(tr.stages[0].logits[i]):>11.4f}{probs}")
    return "\n".join(lines)
