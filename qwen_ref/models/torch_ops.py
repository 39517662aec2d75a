"""The model's ops in plain PyTorch, in HF Qwen2's numerics: the reference every other backend must equal.

Each op has the signature models/backends.py gives it; the model calls them only through a Backends.
Two ops here are not HF's arithmetic: prefill_attention and sdpa_prefill, the default (invariant) backend's prefill
attention, which skip the work above the diagonal and equal attention() up to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Attention scores of one block of queries stay under this many bytes: prefill memory grows linearly with the
# number of keys, never with their square (a 32k-token prompt is attended block by block).
SCORE_BLOCK_BYTES = 64 * 2**20

# prefill_attention's blocks of queries in bfloat16: each block reads only the keys its last query sees
PREFILL_QUERY_BLOCK = 64


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


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
            signed_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rope() on the queries and on the keys of a layer."""
    return rope(q, cos, signed_sin), rope(k, cos, signed_sin)


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
    rows = max(1, SCORE_BLOCK_BYTES // (B * H * S * 4))
    if q_pos is None and window is None and rows >= T:
        return _attend(q, k, v, None, None, scale)  # the last T of the S keys: _attend masks only the T x T corner
    if q_pos is None:
        q_pos = (S - T + torch.arange(T, device=q.device)).expand(B, T)
    if rows >= T:
        return _attend(q, k, v, q_pos, window, scale)
    blocks = [_attend(q[:, :, t : t + rows], k, v, q_pos[:, t : t + rows], window, scale) for t in range(0, T, rows)]
    return torch.cat(blocks, dim=2)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor | None,
                      window: int | None, scale: float) -> torch.Tensor:
    """attention() for a row's queries that are the last T of its S keys (q_pos None, no window), without the work
    above the diagonal; other calls, and float64, run attention() itself.

    float32: sdpa_prefill (torch's flash kernel). bfloat16: attention() itself on blocks of PREFILL_QUERY_BLOCK queries,
    each over only the keys its last query sees. Measured against attention() on Qwen2.5-0.5B's heads, 2 threads:
    float32 1.1x as fast at 64 queries over 64 keys, 1.4x at 32 over 4,096, 8.2x at 4,096 over 4,096 (torch's
    bfloat16 flash kernel is slower than attention() below about 128 x 4,096 scores, and at 4,096 over 4,096
    slower than the blocks); bfloat16 4.6x at 512 over 512, and at 4,096 over 4,096 0.145 s a layer against
    eager's 0.78 s measured in another run of the same session.
    Numbers: attention()'s up to float rounding (the float32 kernel sums in other orders; the bfloat16 blocks'
    softmax rows are shorter), not its bits; tests/test_prefill_attention.py bounds the error against float64.
    Each row and head is computed on its own, so a row's bits do not depend on the batch.
    """
    T, S = q.shape[2], k.shape[2]
    if q_pos is not None or window is not None or q.dtype == torch.float64:
        return attention(q, k, v, q_pos, window, scale)
    if q.dtype == torch.bfloat16:
        # block [t, t + r) holds the last r queries of the first S - T + t + r keys
        blocks = [attention(q[:, :, t : t + r], k[:, :, : S - T + t + r], v[:, :, : S - T + t + r], None, None, scale)
                  for t in range(0, T, PREFILL_QUERY_BLOCK) for r in [min(PREFILL_QUERY_BLOCK, T - t)]]
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=2)  # [B, H, T, D]
    return sdpa_prefill(q, k, v, scale)


def sdpa_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Queries that are the last T of their S keys through F.scaled_dot_product_attention: on the CPU a flash kernel
    (no score matrix in memory, online softmax, key blocks above the diagonal skipped). Float rounding of
    attention(), not its bits; each row and head on its own."""
    T, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    # a chunk after the first: query i sits at position S - T + i (bottom-right causal, which is_causal is not).
    # Queries go in blocks whose boolean masks fit SCORE_BLOCK_BYTES; block [t, t + r) reads only the keys its
    # last query sees, so it is again "the last r of its keys".
    rows = max(1, SCORE_BLOCK_BYTES // S)
    outs = []
    for t in range(0, T, rows):
        r = min(rows, T - t)
        keys = S - T + t + r
        mask = torch.ones(r, keys, dtype=torch.bool, device=q.device).tril(keys - r)  # [r, keys]
        outs.append(F.scaled_dot_product_attention(q[:, :, t : t + r], k[:, :, :keys], v[:, :, :keys],
                                                   attn_mask=mask, scale=scale, enable_gqa=gqa))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # [B, H, T, D]


def _attend(q, k, v, q_pos, window, scale) -> torch.Tensor:
    B, H, T, D = q.shape
    KV, S = k.shape[1], k.shape[2]
    # GQA: query head i reads KV head i // G. The G query heads of a KV head are stacked along the query axis,
    # so one plain batched matmul per KV head serves them, with no repeated keys.
    G = H // KV
    q = q.reshape(B, KV, G * T, D)  # [B, KV, G*T, D] (H = KV*G)
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)  # [B, KV, G*T, S]: the fresh product, in place
    scores = scores.view(B, KV, G, T, S)
    if q_pos is not None:
        mask = attention_mask(q_pos, S, window)  # [B, 1, T, S] -> [B, 1, 1, T, S]
        scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
    elif T > 1:
        # the queries are the last T of the S keys (no window): the causal mask hides only the T x T corner, filled
        # in place; the same scores as the whole mask (bfloat16 prefill at 512 tokens: that pass was 3% of it)
        assert window is None
        hidden = torch.ones(T, T, dtype=torch.bool, device=q.device).triu_(1)  # query i hides key S - T + j, j > i
        scores[..., S - T :].masked_fill_(hidden, float("-inf"))
    # numerics: softmax in float32 (float64 in float64 mode), probabilities cast back before P @ V (HF eager)
    softmax_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    probs = F.softmax(scores, dim=-1, dtype=softmax_dtype).to(q.dtype)
    out = torch.matmul(probs.view(B, KV, G * T, S), v)  # [B, KV, G*T, D]
    return out.view(B, H, T, D)  # [B, H, T, D]
