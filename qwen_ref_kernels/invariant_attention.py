"""Decode attention on the CPU with the batch-invariant kernel's fixed orders: one query per row over its keys.

For each row b and KV head h, with the G query heads that read it (GQA):
    scores = q[b, h] k[b, h]^T          invariant_linear's order over the head size D (C++ head_scores)
    probs  = softmax(scores * scale)    torch, in float32, cast back to the activation dtype (HF's eager order)
    out    = probs v[b, h]              each output element sums its S terms in key order, s = 0, 1, ..., one fmaf
                                        each, in float32, rounded once to the activation dtype (C++ weighted_rows)
Each row is computed by its own calls, so a row's bits never depend on the batch, and each KV head's keys and
values are read once for its G query heads. Against torch's matmuls (measured in one run, Qwen2.5-0.5B shapes, 2
threads, whole decode steps): at 8k cached tokens 51.7 against 55.3 ms in float32 and 40.8 against 47.8 ms in
bfloat16; at 128 tokens about 1 ms less in bfloat16. It is not bit-equal to the BLAS path (another summation
order): against the float64 reference `decode_attention_ref` its error is that of the BLAS path
(tests/test_invariant_attention.py).
"""

from __future__ import annotations

import torch

from qwen_ref_kernels.invariant_linear import extension


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, H, 1, D]; k and v [B, KV, S, D] with contiguous rows (a KV cache's view), float32, bfloat16 or float16
    -> [B, H, 1, D]. Every row attends over all S keys (no mask, no window)."""
    return decode_attention_rows(q, [k], [v], scale)


def decode_attention_rows(q: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor],
                          scale: float) -> torch.Tensor:
    """q [B, H, 1, D]; ks[i] and vs[i] [n_i, KV, S_i, D] (rows contiguous) the keys and values of the next n_i rows
    (the n_i sum to B), each row attending over all S_i of its own: groups of rows with their own lengths, as the
    engine's per-request caches give them -> [B, H, 1, D]. One C++ call for all rows."""
    B, H, _, D = q.shape
    KV = ks[0].shape[1]
    q4 = q.reshape(B, KV, H // KV, D).contiguous()  # [B, KV, G, D]: query head i reads KV head i // G
    return extension().attend_rows(q4, ks, vs, scale).view(B, H, 1, D)  # [B, KV, G, D] -> [B, H, 1, D]


def decode_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The reference: the same attention in float64, returned in float64."""
    H, KV = q.shape[1], k.shape[1]
    kk = k.double().repeat_interleave(H // KV, dim=1)  # [B, H, S, D]
    vv = v.double().repeat_interleave(H // KV, dim=1)
    probs = torch.softmax(q.double() @ kk.transpose(-1, -2) * scale, dim=-1)  # [B, H, 1, S]
    return probs @ vv
