"""Causal prefill attention in bfloat16 and float16 on the CPU: a flash attention in C++ (flash_prefill.cpp, built
into the invariant kernel's module), the invariant backend's attention for bfloat16 and float16 prompts and chunks.

For each row, head and query i (the last T of the row's S keys: query i sits at position S - T + i and sees keys
0 .. S - T + i), in float32 except where it says bfloat16 (float16 for float16 inputs):
    s_j = q . k_j           bfloat16: the head size in pairs, as the avx512_bf16 instruction VDPBF16PS sums them
                            (the linear's bfloat16 step, invariant_linear.py); float16: the head size in order,
                            d = 0, 1, ..., one fmaf each on the inputs widened exactly; then times the scale
    the blocks of 64 keys from key 0 that hold the query's keys, a running maximum m, sum l and output o (m = -inf,
    l = o = 0 at the start); per block:
                m' = max(m, the block's largest s_j over the query's keys);  a = exp(m - m')
                p_j = bfloat16(exp(s_j - m'))                      to nearest even; keys past i's position: 0
                l = l * a + the block's 64 p_j (16 lanes of 4 keys each, then folded in halves)
                o = o * a + sum of p_j v_j over the query's keys of the block: bfloat16 in pairs (2j', 2j' + 1)
                    as VDPBF16PS sums them (the odd key first), a last key alone in its pair paired with a zero
                    key (p = 0, v = 0), so that no key past the query's position enters its sum; float16 key by
                    key, one fmaf each
    out = bfloat16(o / l)
exp is a float32 polynomial within 2 units in the last place (flash_prefill.cpp exp16). Every step is written out,
so a query's numbers depend on its row and position only: never on the batch, on T, or on how a prompt is cut
into chunks. tests/test_flash_prefill.py checks chunks against one pass, and the kernel against an independent
float32 replay of these steps (tests/flash_prefill_replay.py), bit for bit, the signs of zeros included.

Against float64 its error is about half of HF's eager bfloat16 attention's (the scores stay in float32; eager
rounds them to bfloat16). Against torch_ops.prefill_attention's bfloat16 blocks (eager on blocks of 64 queries),
one layer, 2 threads, best of 3 (Zen 5): Qwen2.5-0.5B's heads (14 / 2, head size 64) at 512 tokens 1.1 against
5.2 ms, at 4,096 61.3 against 260 ms (490 GFLOP/s of the two products), 32 queries over 4,096 keys (an engine
chunk) 1.1 against 1.7 ms; Qwen1.5's 16 heads at 4,096 70.8 against 222 ms; the coder's 40 / 8 heads of 128 at
1,024 19.6 against 32.0 ms (benchmarks/bench_prefill.py for whole prompts).
In bfloat16 it needs the avx512_bf16 instruction to be fast; the backend uses it there only where the CPU has it
(invariant_linear.extension().native_bf16_pairs()). float16 runs on plain multiply-adds, twice the instructions
of the pairs: at 4,096 tokens 92.7 against 289 ms for torch's float16 flash kernel (torch_ops.prefill_attention's
float16 path), 324 GFLOP/s; 512 tokens 1.7 against 10.8 ms; the coder's heads at 1,024 32.7 against 117 ms.
"""

from __future__ import annotations

import torch

from qwen_ref_kernels.invariant_linear import extension


def flash_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, H, T, D]; k and v [B, KV, S, D] (a cache's view: the last dimension contiguous), bfloat16 or float16
    (one dtype) on the CPU,
    D a multiple of 64, T <= S, H a multiple of KV -> [B, H, T, D]; row b's queries are the last T of its S keys."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"flash_prefill: {name} must be a 4-d tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dtype not in (torch.bfloat16, torch.float16) or t.dtype != q.dtype or t.device.type != "cpu":
            raise ValueError(f"flash_prefill: {name} is {t.dtype} on {t.device}; it takes bfloat16 or float16 (as "
                             "q) on the CPU")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"flash_prefill: scale must be a number, got {type(scale).__name__}")
    B, H, T, D = q.shape
    if (k.shape != v.shape or k.shape[0] != B or k.shape[3] != D or not k.shape[1] or H % k.shape[1]
            or k.shape[2] < T or not D or D % 64):
        raise ValueError(f"flash_prefill: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit "
                         "(want q [B, H, T, D], k and v [B, KV, S, D], T <= S, KV dividing H, D a multiple of 64)")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return extension().flash_prefill(q, k, v, scale)


def flash_prefill_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The reference: the same causal attention in float64, returned in float64."""
    T, S = q.shape[2], k.shape[2]
    G = q.shape[1] // k.shape[1]
    kk, vv = (t.double().repeat_interleave(G, dim=1) for t in (k, v))  # [B, H, S, D]
    scores = q.double() @ kk.transpose(-1, -2) * scale  # [B, H, T, S]
    hidden = torch.ones(T, S, dtype=torch.bool).triu_(S - T + 1)  # query i sees keys <= S - T + i
    return torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1) @ vv
