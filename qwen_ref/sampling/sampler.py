"""The sampler's step in the decode loop: per request its state (parameters, history, seed, step), one
seeded draw per row from the row's final distribution, and the logprobs of the chosen tokens."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from qwen_ref.sampling.final_distribution import RowDistribution, row_distributions, stages_0_to_2
from qwen_ref.sampling.params import SamplingParams, as_params
from qwen_ref.sampling.penalties import History, PenaltyState
from qwen_ref.sampling.rng import fresh_seed, uniform
from qwen_ref.sampling.stages import SamplingError


@dataclass
class RequestState:
    """A request's sampler state: its parameters, penalty history, seed and the index of its next draw."""

    params: SamplingParams
    penalties: PenaltyState
    seed: int
    step: int = 0

    @classmethod
    def start(cls, params: SamplingParams | Mapping[str, object], prompt_ids: Iterable[int]) -> RequestState:
        sp = as_params(params)
        return cls(sp, PenaltyState(prompt_ids), sp.seed if sp.seed is not None else fresh_seed())

    def accept(self, token: int) -> None:
        """Record the token this request produced; the next draw uses the next step."""
        self.penalties.add_output(token)
        self.step += 1


@dataclass(frozen=True)
class TokenLogprobs:
    """The chosen token's log-probability under the raw distribution (log_softmax of the model's logits)
    and under the final sampling distribution, with the n best alternatives of each (ties: lower id)."""

    token: int
    raw: float
    final: float
    raw_top: tuple[tuple[int, float], ...]
    final_top: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class ForcedLogprobs:
    """A given token's log-probability under the raw distribution, with the n best alternatives (ties: lower id):
    teacher forcing, as for a prompt's tokens, where there is no sampling distribution."""

    token: int
    raw: float
    raw_top: tuple[tuple[int, float], ...]


def forced_logprobs(logits: Tensor, tokens: Sequence[int], n: int) -> list[ForcedLogprobs]:
    """Row t of logits [T, V] scored against tokens[t], with the same numbers as a sampled token's `raw`."""
    raw = torch.log_softmax(logits.to(torch.float64), dim=-1)  # float64 keeps the digits of small logprobs
    chosen = raw.gather(1, torch.tensor(list(tokens), device=raw.device)[:, None])[:, 0].tolist()  # [T, 1] -> [T]
    return [ForcedLogprobs(t, lp, top) for t, lp, top in zip(tokens, chosen, _raw_top(raw, n), strict=True)]


def sample(logits: Tensor, rows: Sequence[RequestState], *, allowed: Tensor | None = None,
           logprobs: int | None = None) -> tuple[Tensor, list[TokenLogprobs] | None]:
    """One decode step: a token per row of `logits` [B, V], drawn with rows[b]'s parameters, history, seed and
    step. Does not advance the rows (call `accept`). With `logprobs=n`, also per-row TokenLogprobs."""
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int) or logprobs < 0):
        raise SamplingError(f"logprobs: {logprobs!r} must be a non-negative integer (the number of alternatives)")
    params = [r.params for r in rows]
    z2 = stages_0_to_2(logits, params, History.stack([r.penalties for r in rows]), allowed)
    dists = row_distributions(z2, params)
    tokens = [int(d.ids[0] if d.one_hot else d.ids[draw_index(d.probs, uniform(r.seed, r.step))])
              for d, r in zip(dists, rows, strict=True)]
    info = None if logprobs is None else _logprobs(logits, tokens, dists, logprobs)
    return torch.tensor(tokens, dtype=torch.long, device=logits.device), info


def draw(probs: Tensor | np.ndarray, seed: int, step: int) -> int:
    """The seeded draw from a final distribution over token ids 0..V-1 (docs/sampling.md, "The draw")."""
    p = torch.as_tensor(probs).detach().to("cpu", torch.float64).numpy()
    if p.ndim != 1 or not np.all(np.isfinite(p)) or np.any(p < 0) or not np.any(p > 0):
        raise SamplingError("draw: probs must be a 1-D vector of finite, non-negative values, not all zero")
    return draw_index(p, uniform(seed, step))


def draw_index(probs: np.ndarray, u: float) -> int:
    """The inverse CDF: the smallest i whose sequential float64 cumulative sum exceeds u * total."""
    cdf = np.cumsum(probs)  # float64, sequential left to right in token-id order
    i = int(np.searchsorted(cdf, u * cdf[-1], side="right"))  # the smallest i with cdf[i] > u * total
    if i == len(cdf):  # u * total rounded up to total: the last token with nonzero probability
        i = int(np.flatnonzero(probs)[-1])
    return i


def _logprobs(logits: Tensor, tokens: list[int], dists: list[RowDistribution], n: int) -> list[TokenLogprobs]:
    raw = torch.log_softmax(logits.to(torch.float64), dim=-1)  # float64 keeps the digits of small logprobs
    chosen = raw.gather(1, torch.tensor(tokens, device=raw.device)[:, None])[:, 0].tolist()  # [B, 1] -> [B]
    raw_tops = _raw_top(raw, n)
    out = []
    for token, raw_lp, raw_top, d in zip(tokens, chosen, raw_tops, dists, strict=True):
        with np.errstate(divide="ignore"):
            log_p = np.log(d.probs)  # exact zeros (underflow) give -inf
        order = [j for j in np.lexsort((d.ids, -d.probs)) if d.probs[j] > 0][:n]  # p descending, then lower id
        final = float(log_p[np.searchsorted(d.ids, token)])
        out.append(TokenLogprobs(token, raw_lp, final, raw_top,
                                 tuple((int(d.ids[j]), float(log_p[j])) for j in order)))
    return out


def _raw_top(raw: Tensor, n: int) -> list[tuple[tuple[int, float], ...]]:
    if n <= 0:
        return [()] * raw.shape[0]
    kth = torch.topk(raw, min(n, raw.shape[-1]), dim=-1).values[:, -1:]  # [B, 1]
    out = []
    for row in range(raw.shape[0]):
        ids = torch.nonzero(raw[row] >= kth[row]).flatten().cpu().numpy()  # the n best, ties at the n-th included
        values = raw[row, torch.from_numpy(ids).to(raw.device)].cpu().numpy()
        order = np.lexsort((ids, -values))[:n]
        out.append(tuple((int(ids[j]), float(values[j])) for j in order))
    return out
