"""The final distribution of each row of a batch: stages 0-2 batched, then stages 3-6 per row in float64.

Where the numbers are computed (the reason each row's result is independent of its batch and device):
- stages 0-2 and the top_k selection run batched on the logits' device, in the logits' dtype. They are
  elementwise IEEE operations (exact or correctly rounded) and exact selections, so every row gets the same
  bits whatever else is in the batch and on any device.
- temperature, top_p, the final softmax and the draw run per row on the CPU in float64 numpy, over the tokens
  that top_k kept, with every sum taken sequentially in a documented order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from qwen_ref.sampling.params import SamplingParams, as_params
from qwen_ref.sampling.penalties import (
    History,
    PenaltyState,
    frequency_presence_penalty_,
    penalty_values,
    repetition_penalty_,
)
from qwen_ref.sampling.stages import (
    NEG_INF,
    SamplingError,
    argmax_tokens,
    kth_largest,
    mask_disallowed,
    nucleus,
    sequential_softmax,
)


@dataclass(frozen=True)
class RowDistribution:
    """A row's final distribution, sparse: probs[j] is the probability of token ids[j]; ids ascending.
    Every token not listed has probability exactly 0."""

    ids: np.ndarray  # int64
    probs: np.ndarray  # float64
    one_hot: bool  # T = 0: probability 1 on the argmax ids[0]; there is no draw and the seed is not used

    def dense(self, vocab_size: int) -> Tensor:
        out = torch.zeros(vocab_size, dtype=torch.float64)
        out[torch.from_numpy(self.ids)] = torch.from_numpy(self.probs)
        return out


def distribution(logits: Tensor, params: SamplingParams | Mapping[str, object], prompt_ids: Iterable[int] = (),
                 output_ids: Iterable[int] = (), allowed: Tensor | None = None) -> Tensor:
    """The final distribution (float64, CPU, shape [V]) that the draw uses for 1-D `logits`; for
    temperature 0 it is one-hot on the greedy token. `params` uses the schema's field names."""
    sp = as_params(params)
    if logits.dim() != 1:
        raise SamplingError(f"distribution: logits must be 1-D [V]; got shape {tuple(logits.shape)}")
    history = History.stack([PenaltyState(prompt_ids, output_ids)])
    z2 = stages_0_to_2(logits[None], [sp], history, None if allowed is None else allowed[None])  # [1, V]
    return row_distributions(z2, [sp])[0].dense(logits.shape[-1])


def stages_0_to_2(logits: Tensor, params: Sequence[SamplingParams], history: History,
                  allowed: Tensor | None) -> Tensor:
    """Stages 0, 1 and 2 of a batch [B, V], with the checks that make an unsamplable row an error, not a NaN."""
    if logits.dim() != 2 or logits.shape[0] != len(params) or not logits.is_floating_point():
        raise SamplingError(f"logits must be a float tensor [B, V] with B = {len(params)} rows; "
                            f"got {tuple(logits.shape)} {logits.dtype}")
    z = widened(logits)
    if allowed is not None and (allowed.shape != z.shape or allowed.dtype != torch.bool):
        raise SamplingError(f"allowed must be a bool tensor {tuple(z.shape)}; got {tuple(allowed.shape)} "
                            f"{allowed.dtype}")
    row_max = z.amax(dim=-1)  # [B]; amax propagates NaN, so one reduction finds NaN, +inf and all -inf
    _check_rows(row_max, "the logits contain NaN or +inf", lambda m: torch.isnan(m) | torch.isposinf(m))
    z0 = z if allowed is None else mask_disallowed(z, allowed.to(z.device))
    if allowed is not None:
        row_max = z0.amax(dim=-1)
    _check_rows(row_max, "every token is masked (all logits are -inf); nothing can be sampled", torch.isneginf)
    if history.ids.numel() and int(history.ids.max()) >= z.shape[-1]:
        raise SamplingError(f"token id {int(history.ids.max())} in the history is outside the vocabulary "
                            f"of {z.shape[-1]}")
    if history.ids.numel() == 0:
        return z0
    history = history.to(z.device)
    r, f, p = penalty_values(params, z.device)
    # the one working copy (the widened or masked logits already are one); stages 1 and 2 write only the seen
    # tokens' entries
    z2 = z0.clone() if z0 is logits else z0
    repetition_penalty_(z2, history, r)
    frequency_presence_penalty_(z2, history, f, p)
    return z2


def widened(logits: Tensor) -> Tensor:
    # numerics: float16/bfloat16 logits are widened (exactly) to float32; float32 and float64 stay as they are
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def _check_rows(row_max: Tensor, problem: str, bad: Callable[[Tensor], Tensor]) -> None:
    rows = torch.nonzero(bad(row_max)).flatten().tolist()
    if rows:
        raise SamplingError(f"row {rows[0]}: {problem}")


def row_distributions(z: Tensor, params: Sequence[SamplingParams]) -> list[RowDistribution]:
    """From the stage-2 logits of a batch [B, V] to each row's final distribution."""
    out: list[RowDistribution | None] = [None] * len(params)
    greedy_rows = [b for b, p in enumerate(params) if p.greedy]
    if greedy_rows:
        for b, token in zip(greedy_rows, argmax_tokens(z[greedy_rows]).tolist(), strict=True):
            out[b] = RowDistribution(np.array([token], dtype=np.int64), np.ones(1), one_hot=True)
    sampled = [b for b, p in enumerate(params) if not p.greedy]
    if sampled:
        zs = z if len(sampled) == len(params) else z[sampled]
        for i, (ids, values) in enumerate(_top_k_survivors(zs, [params[b].top_k or 0 for b in sampled])):
            p = params[sampled[i]]
            out[sampled[i]] = _finish_row(ids, values, p.temperature, p.top_p)
    return out  # type: ignore[return-value]


def _top_k_survivors(z: Tensor, k: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per row, the ascending ids of the finite tokens that stage 4 keeps (the same set as
    isfinite(top_k(z, k)), without writing a masked [B, V] tensor) and their logits, widened to float64."""
    vocab = z.shape[-1]
    limited = [0 < kb < vocab for kb in k]
    if any(limited):
        kth, top_values, top_ids = kth_largest(z, torch.tensor(k))
        after_kth = top_values.gather(1, torch.tensor(k, device=z.device).clamp(0, top_values.shape[1] - 1)[:, None])
        tie_after_kth = (after_kth == kth)[:, 0].tolist()  # is the (k+1)-th largest equal to the k-th?
        # numerics: the selected logits widened exactly to float64, for all rows at once
        top_ids_np, top_values_np = top_ids.cpu().numpy(), top_values.to("cpu", torch.float64).numpy()
    out = []
    for b, kb in enumerate(k):
        if not limited[b]:
            row = z[b].to("cpu", torch.float64).numpy()  # numerics: exact widening to float64
            if np.isneginf(row).any():
                ids = np.flatnonzero(row > NEG_INF)
                out.append((ids, row[ids]))
            else:
                out.append((np.arange(len(row)), row))
            continue
        if not tie_after_kth[b]:  # the k largest are exactly the tokens >= the k-th: topk's own ids and values
            order = np.argsort(top_ids_np[b, :kb])  # the ids are distinct
            ids, values = top_ids_np[b, order], top_values_np[b, order]
            finite = values > NEG_INF
            out.append((ids[finite], values[finite]))
            continue
        ids_t = torch.nonzero(z[b] >= kth[b]).flatten()
        ids_t = ids_t[z[b, ids_t] > NEG_INF]
        out.append((ids_t.cpu().numpy(), z[b, ids_t].to("cpu", torch.float64).numpy()))  # exact widening
    return out


def _finish_row(ids: np.ndarray, z: np.ndarray, t: float, q: float | None) -> RowDistribution:
    """Stages 3, 5 and 6 for one sampled row; `z` holds the finite stage-2 logits of the tokens top_k kept."""
    with np.errstate(over="ignore"):
        # float64: shift, then scale. max(y) = 0 exactly; for tiny T or huge gaps the others overflow to -inf,
        # which is probability 0, never +inf or NaN
        y = (z - z.max()) / t
    if q is not None and q < 1.0:
        keep = np.sort(nucleus(sequential_softmax(y), q))
        ids, y = ids[keep], y[keep]
    return RowDistribution(ids, sequential_softmax(y), one_hot=False)
