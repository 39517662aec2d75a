"""The stages of docs/sampling.md as pure functions over a batch of logits [B, V], with per-row parameters
as tensors of shape [B]; and the float64 pieces that stages 5 and 6 are made of.

Stage 0 (mask), 3 (temperature or argmax), 4 (top_k) and 5 (top_p) are here; stages 1 and 2 (the penalties)
live in penalties.py beside the token history they read. The sampler itself runs stages 3, 5 and 6 per row
in float64 (final_distribution.py); the batched `temperature` and `top_p` here compute the same stages for
use outside the sampler and for the comparison with HF.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from qwen_ref.errors import QwenRefError

NEG_INF = float("-inf")


class SamplingError(QwenRefError, ValueError):
    """The logits cannot be sampled: NaN or +inf in them, every token masked, or a malformed input."""


def mask_disallowed(logits: Tensor, allowed: Tensor | None) -> Tensor:
    """Stage 0: tokens whose entry in the boolean mask `allowed` [B, V] is False get -inf."""
    return logits.clone() if allowed is None else logits.masked_fill(~allowed, NEG_INF)


def argmax_tokens(logits: Tensor) -> Tensor:
    """Stage 3 for T = 0: the argmax of each row, [B]; torch.argmax returns the first maximum, so ties go to
    the lowest id."""
    return torch.argmax(logits, dim=-1)


def temperature(logits: Tensor, t: Tensor) -> Tensor:
    """Stage 3: z / T on rows with T > 0; rows with T = 0 (greedy) are returned unchanged."""
    t = t.to(logits.dtype)[:, None]  # [B] -> [B, 1]; numerics: T is rounded to the logits' dtype, as in HF
    return torch.where(t > 0, logits / torch.where(t > 0, t, 1.0), logits)


def top_k(logits: Tensor, k: Tensor) -> Tensor:
    """Stage 4: keep every token whose logit is >= the k-th largest of its row (ties at the k-th are all
    kept); the rest get -inf. k <= 0 or k >= V means no limit."""
    kth, _, _ = kth_largest(logits, k)
    return logits.masked_fill(logits < kth, NEG_INF)


def kth_largest(logits: Tensor, k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The k-th largest logit of each row ([B, 1]; -inf on rows without a limit), then the values and ids
    of each row's largest logits in order ([B, k_max + 1] where V allows). topk selects, it does not
    compute, so the values are exact on any device."""
    k = k.to(logits.device)
    limited = (k > 0) & (k < logits.shape[-1])
    k_max = int(k[limited].max()) if bool(limited.any()) else 1
    values, ids = torch.topk(logits, min(k_max + 1, logits.shape[-1]), dim=-1)
    kth = values.gather(1, (k.clamp(1, k_max) - 1)[:, None])  # [B, 1]
    return torch.where(limited[:, None], kth, NEG_INF), values, ids


def top_p(logits: Tensor, q: Tensor) -> Tensor:
    """Stage 5 on rows with q < 1: keep the smallest prefix of the tokens sorted by probability (descending,
    ties by lower id) whose cumulative probability is >= q, at least one token; the rest get -inf.
    Computed per row on the CPU in float64 (see `nucleus`), returned in the input's dtype and device."""
    out = logits.clone()
    for row, q_row in enumerate(q.tolist()):
        if q_row >= 1.0:
            continue
        values = logits[row].to("cpu", torch.float64).numpy()  # numerics: exact widening to float64
        finite = np.flatnonzero(np.isfinite(values))
        if finite.size == 0:
            continue
        keep = np.zeros(values.shape, dtype=bool)
        keep[finite[nucleus(sequential_softmax(values[finite]), q_row)]] = True
        out[row].masked_fill_(~torch.from_numpy(keep).to(logits.device), NEG_INF)
    return out


def sequential_softmax(y: np.ndarray) -> np.ndarray:
    """float64 softmax; the normaliser is the sequential left-to-right sum in position order (np.cumsum is
    a plain loop; np.sum is pairwise and is never used for it)."""
    top = y.max()
    e = np.exp(y - top if top != 0 else y)  # -inf entries give exactly 0; y - 0 would be y anyway
    return e / np.cumsum(e)[-1]


def nucleus(probs: np.ndarray, q: float) -> np.ndarray:
    """Positions of the smallest prefix of the order (probability descending, position ascending) whose
    sequential cumulative sum is >= q; at least one. Only the needed head of the order is sorted: the
    tokens with probability >= the h-th largest are exactly a prefix of the full order, ties included."""
    n = len(probs)
    head = 64
    while True:
        if head >= n:
            candidates = np.arange(n)
        else:
            threshold = np.partition(probs, n - head)[n - head]
            candidates = np.flatnonzero(probs >= threshold)
        order = candidates[np.argsort(-probs[candidates], kind="stable")]
        cumulative = np.cumsum(probs[order])  # float64, sequential in the sorted order
        cut = int(np.searchsorted(cumulative, q, side="left"))  # the first j with cumulative[j] >= q
        if cut < len(order) or len(order) == n:
            return order[: cut + 1]
        head *= 8
