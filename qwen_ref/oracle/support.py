"""Why our sampler could not have produced a token, told by the sampler's own stages.

`distribution` (qwen_ref.sampling) decides whether a token is in the support; this module only explains a
token it gives probability 0, and measures how far it is from the boundary. Every step is the sampler's own
function on the sampler's own operands (docs/sampling.md): stage 0 `mask_disallowed`, stage 1
`repetition_penalty`, stage 2 `frequency_presence_penalty`, stage 4 `top_k`, stage 3 `temperature` applied as
the sampler applies it (float64, after shifting by the largest logit), stage 5 `top_p`; the mass before a token
is the sequential sum, in stage 5's order, of the probabilities stage 5 cuts (`distribution` without top_p). So
the explanation and the sampler cannot disagree on which stage removed a token.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from qwen_ref.sampling import (
    History,
    PenaltyState,
    SamplingParams,
    distribution,
    frequency_presence_penalty,
    mask_disallowed,
    repetition_penalty,
    temperature,
    top_k,
    top_p,
)


def penalized(logits: Tensor, sp: SamplingParams, prompt_ids: Sequence[int], output_ids: Sequence[int]) -> Tensor:
    """The logits [1, V] after stages 0-2 (no mask: the oracle has no JSON mode; then the penalties), on the CPU,
    in the dtype the sampler computes them in."""
    x = logits[None].cpu()
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()  # numerics: exact widening, as the sampler
    history = History.stack([PenaltyState(prompt_ids, output_ids)])
    z0 = mask_disallowed(x, None)
    z1 = repetition_penalty(z0, history, _column(sp.repetition_penalty, 1.0))
    return frequency_presence_penalty(z1, history, _column(sp.frequency_penalty, 0.0),
                                      _column(sp.presence_penalty, 0.0))


def greedy_margin(logits: Tensor, sp: SamplingParams, prompt_ids: Sequence[int], output_ids: Sequence[int],
                  ours: int, theirs: int) -> float:
    """By how much our greedy token's penalised logit beats the backend's token's (float64)."""
    z2 = penalized(logits, sp, prompt_ids, output_ids)[0].to(torch.float64)  # numerics: exact widening
    return float(z2[ours] - z2[theirs])


def exclusion(logits: Tensor, token: int, sp: SamplingParams, prompt_ids: Sequence[int],
              output_ids: Sequence[int]) -> tuple[str, float, str]:
    """Why our sampler cannot produce `token` (a sampled row, temperature > 0), and by how much: (reason, margin,
    unit) with unit "logit" (below the top_k boundary) or "mass" (probability mass past the top_p boundary)."""
    z2 = penalized(logits, sp, prompt_ids, output_ids)
    if not torch.isfinite(z2[0, token]):
        return "the penalties remove it (repetition_penalty's r -> 0 limit)", math.inf, "logit"
    zk = top_k(z2, torch.tensor([sp.top_k or 0]))
    kept = torch.isfinite(zk[0])
    if not kept[token]:
        kth = float(zk[0][kept].min())  # the k-th largest logit, ties counted: the smallest that top_k keeps
        below = kth - float(z2[0, token])
        return f"outside top_k={sp.top_k}: {below:.3g} below the k-th logit", below, "logit"
    if sp.top_p is None or sp.top_p >= 1.0:
        return "outside the support", math.inf, "logit"
    z = zk.to(torch.float64)  # numerics: exact widening; stages 3, 5 and 6 run in float64
    y = temperature(z - z.max(), torch.tensor([sp.temperature], dtype=torch.float64))  # shift, then scale
    if torch.isfinite(top_p(y, torch.tensor([sp.top_p], dtype=torch.float64))[0, token]):
        return "outside the support", math.inf, "logit"  # top_p keeps it: its probability underflows to 0
    above = _mass_before(logits, token, sp, prompt_ids, output_ids, torch.nonzero(kept).flatten().numpy())
    q = sp.top_p
    return (f"outside top_p={q}: the tokens before it already hold {above:.6f} >= {q} (by {above - q:.3g})",
            above - q, "mass")


def _mass_before(logits: Tensor, token: int, sp: SamplingParams, prompt_ids: Sequence[int],
                 output_ids: Sequence[int], ids: np.ndarray) -> float:
    """The probability, summed as stage 5 sums it, of the tokens ahead of `token` in stage 5's order
    (probability descending, lower id first) among `ids`, the tokens top_k kept."""
    before_top_p = distribution(logits, dataclasses.replace(sp, top_p=None), prompt_ids, output_ids)
    p = before_top_p.numpy()[ids]
    order = np.lexsort((ids, -p))
    where = int(np.flatnonzero(ids[order] == token)[0])
    return float(np.cumsum(p[order])[where - 1]) if where else 0.0  # float64, sequential, as stage 5


def _column(value: float | None, absent: float) -> Tensor:
    return torch.tensor([absent if value is None else value], dtype=torch.float64)
