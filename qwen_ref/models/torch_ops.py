"""The model's ops in plain PyTorch, in HF Qwen2's numerics: the reference every other backend must equal.

Each op has the signature models/backends.py gives it; the model calls them only through a Backends.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Attention scores of one block of queries stay under this many bytes: prefill memory grows linearly with the
# number of keys, never with their square (a 32k-token prompt is attended block by block).
SCORE_BLOCK_BYTES = 64 * 2**20


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # numerics: normalise in float32 (float64 in float64 mode), cast back to the input dtype, then multiply by
    # the weight (HF's order)
    h = x.float() if x.dtype != torch.float64 else x
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def linear(x: torch.Tensor, layers: Sequence[nn.Linear]) -> list[torch.Tensor]:
    """x through each of several Linear layers that read it (q/k/v, gate/up)."""
    return [F.linear(x, m.weight, m.bias) for m in layers]


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The MLP's activation, silu(gate) * up, as HF."""
    return F.silu(gate) * up


def silu_mul_rowwise(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu_mul with each row [1, T, N] of the batch computed by its own silu call, as the row is computed alone.

    torch's silu computes most elements with vectorized exp and the few left at the end of its loop (or of a
    thread's share) with scalar exp, and the two differ in the last bit. In one call over [B, 1, N] an element's
    place in those loops depends on B, so a row's bits could depend on the batch; they did for N = 176 (issue 17).
    The product with up is exact elementwise either way."""
    if gate.shape[0] == 1:
        return silu_mul(gate, up)
    return torch.cat([F.silu(g) for g in gate.split(1)]) * up  # [B, T, N]


def rope_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin [..., D] with its first half negated, once per forward: what rope() multiplies the swapped halves by."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """HF's x * cos + rotate_half(x) * sin, bit for bit, in 4 ops instead of 7: rotate_half(x) is
    cat(-x2, x1) = roll(x, D/2) with the first half negated, and (-a) * s == a * (-s) exactly in IEEE arithmetic,
    so the negation moves onto sin (rope_sin) and is paid once per forward instead of once per layer."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def attention_mask(q_pos: torch.Tensor, num_keys: int, window: int | None) -> torch.Tensor:
    """Boolean [B, 1, T, S]: the query at position p sees key j iff j <= p (and j > p - window when sliding).

    Each row has its own positions, so the causal mask is aligned to where each row is, never top-left.
    """
    k_pos = torch.arange(num_keys, device=q_pos.device)
    allowed = k_pos[None, None, :] <= q_pos[:, :, None]  # [B, T, S]
    if window is not None:
        allowed &= k_pos[None, None, :] > q_pos[:, :, None] - window
    return allowed[:, None]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor | None, window: int | None,
              scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v with GQA: q [B, H, T, D], k and v [B, KV, S, D] -> [B, H, T, D].

    q_pos [B, T] are the queries' positions (key j sits at position j). None: every row's queries are the
    last T of its S keys, with no padding (then a single query per row needs no mask unless sliding).
    Queries are taken in blocks whose scores fit SCORE_BLOCK_BYTES.
    """
    B, H, T, _ = q.shape
    S = k.shape[2]
    if q_pos is None and (T > 1 or window is not None):
        q_pos = (S - T + torch.arange(T, device=q.device)).expand(B, T)
    rows = max(1, SCORE_BLOCK_BYTES // (B * H * S * 4))
    if rows >= T:
        return _attend(q, k, v, q_pos, window, scale)
    blocks = [_attend(q[:, :, t : t + rows], k, v, q_pos[:, t : t + rows], window, scale) for t in range(0, T, rows)]
    return torch.cat(blocks, dim=2)


def _attend(q, k, v, q_pos, window, scale) -> torch.Tensor:
    B, H, T, D = q.shape
    KV, S = k.shape[1], k.shape[2]
    # GQA: query head i reads KV head i // G. The G query heads of a KV head are stacked along the query axis,
    # so one plain batched matmul per KV head serves them, with no repeated keys.
    G = H // KV
    q = q.reshape(B, KV, G * T, D)  # [B, KV, G*T, D] (H = KV*G)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, KV, G*T, S]
    scores = scores.view(B, KV, G, T, S)
    if q_pos is not None:
        mask = attention_mask(q_pos, S, window)  # [B, 1, T, S] -> [B, 1, 1, T, S]
        scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
    # numerics: softmax in float32 (float64 in float64 mode), probabilities cast back before P @ V (HF eager)
    softmax_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    probs = F.softmax(scores, dim=-1, dtype=softmax_dtype).to(q.dtype)
    out = torch.matmul(probs.view(B, KV, G * T, S), v)  # [B, KV, G*T, D]
    return out.view(B, H, T, D)  # [B, H, T, D]
