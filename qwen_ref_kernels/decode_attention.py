"""Decode attention (one new query per row) over a KV cache with per-row lengths: split-KV flash-decoding.

    out[b, h] = softmax((q[b, h] @ k_cache[b, h // G, :n]^T) * scale) @ v_cache[b, h // G, :n],   n = seq_lens[b]

With one query there is too little work per (row, head) to fill a GPU, so each row's keys are cut into
NUM_SPLITS chunks handled by separate programs (flash-decoding). Pass 1 writes, per split, the normalised
partial output and its log-sum-exp; pass 2 rescales and sums the splits. Each pass-1 program serves all G query
heads of one KV head, so every K/V tile is read from memory once per GQA group: a [G, D] x [D, BLOCK_N] dot.
Chunks are cut from each row's own length inside the kernel, so there is no host sync on seq_lens (CUDA-graph
friendly) and short rows do not pay for long ones; splits past a row's end write an empty partial.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import check_device, check_float, check_last_dim_contiguous, interpreted, round_to

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
MAX_SPLITS = 64


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, lens_ptr,  # q [B, Hq, 1, D], k/v [B, Hkv, S, D], lens [B]
    o_part_ptr, lse_ptr,  # fp32 partials [B, Hq, NUM_SPLITS, D] and [B, Hq, NUM_SPLITS] (log2 units)
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    Hq, G, S, D, qk_scale, NUM_SPLITS,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.minimum(tl.maximum(tl.load(lens_ptr + b).to(tl.int32), 0), S)  # clamped: memory-safe
    per_split = (seq_len + NUM_SPLITS - 1) // NUM_SPLITS
    chunk = (per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N  # whole tiles per split, cut from this row's length
    lo = split * chunk
    hi = tl.minimum(lo + chunk, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kvh * G + offs_g  # the GQA group of this KV head
    q_mask = (offs_g < G)[:, None] & (offs_d < D)[None, :]
    q_ptrs = q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)  # [BG, BD]
    if DOT_F32:  # the interpreter cannot multiply bf16; fp32 products of 16-bit inputs are exact anyway
        q = q.to(tl.float32)
    k_base = k_ptr + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        keys = start + offs_n
        kv_mask = (keys < hi)[:, None] & (offs_d < D)[None, :]
        k = tl.load(k_base + keys[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)  # [BN, BD]
        v = tl.load(v_base + keys[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)  # [BN, BD]
        p_dtype = v.dtype
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BG, BN] logits in log2 units
        s = tl.where((keys < hi)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every tile holds at least one key
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        # numerics: P rounded to V's dtype before P @ V, as the model rounds its probabilities (fp32 accumulator)
        p = round_to(p, p_dtype, INTERPRET)
        if DOT_F32:
            p = p.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m_i = m_new

    empty = l_i == 0.0  # a split past the row's end (or an empty row)
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    part = (b * Hq + heads).to(tl.int64) * NUM_SPLITS + split  # [BG] row index into the partials
    tl.store(o_part_ptr + part[:, None] * D + offs_d[None, :], o, mask=q_mask)
    tl.store(lse_ptr + part, lse, mask=offs_g < G)


@triton.jit
def _decode_reduce_kernel(
    o_part_ptr, lse_ptr, out_ptr,  # partials as above; out [B, Hq, 1, D]
    stride_ob, stride_oh, Hq, D, NUM_SPLITS,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)  # = b * Hq + h
    b = pid // Hq
    h = pid % Hq
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    lse = tl.load(lse_ptr + pid.to(tl.int64) * NUM_SPLITS + offs_s, mask=offs_s < NUM_SPLITS, other=float("-inf"))
    m = tl.max(lse, axis=0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))  # [BS]: each split's share; 0 for empty splits
    mask = (offs_s < NUM_SPLITS)[:, None] & (offs_d < D)[None, :]
    rows = pid.to(tl.int64) * NUM_SPLITS + offs_s
    o = tl.load(o_part_ptr + rows[:, None] * D + offs_d[None, :], mask=mask, other=0.0)  # [BS, BD]
    total = tl.sum(w, axis=0)
    out = tl.sum(w[:, None] * o, axis=0) / tl.where(total == 0.0, 1.0, total)  # an empty row gives 0
    out_ptrs = out_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_d
    tl.store(out_ptrs, round_to(out, out_ptr.dtype.element_ty, INTERPRET), mask=offs_d < D)


def _default_splits(device: torch.device, programs: int, max_tiles: int) -> int:
    """Enough splits for about two programs per SM; 4 under the interpreter."""
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4 * programs
    return max(1, min(MAX_SPLITS, max_tiles, triton.cdiv(target, programs)))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """q [B, Hq, 1, D] against the first seq_lens[b] positions of k_cache, v_cache [B, Hkv, S, D].

    Returns [B, Hq, 1, D] in q's dtype (a view of a [B, 1, Hq, D] buffer). seq_lens [B] is int32/int64 on q's
    device; values are clamped to [0, S] and a row of length 0 gives 0.
    """
    name = "decode_attention"
    for arg, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
        check_float(name, arg, t)
        if t.dim() != 4:
            raise ValueError(f"{name}: {arg} must be 4-D [B, H, T, D], got shape {tuple(t.shape)}")
        check_last_dim_contiguous(name, arg, t)
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"{name}: q, k_cache, v_cache must share one dtype, got {q.dtype}, {k_cache.dtype}, "
                        f"{v_cache.dtype}")  # fmt: skip
    B, Hq, Tq, D = q.shape
    Bk, Hkv, S, Dk = k_cache.shape
    if Tq != 1:
        raise ValueError(f"{name}: q must hold one query per row, got shape {tuple(q.shape)}; use attention()")
    if tuple(v_cache.shape) != tuple(k_cache.shape):
        raise ValueError(f"{name}: v_cache has shape {tuple(v_cache.shape)}; expected {tuple(k_cache.shape)}")
    if Bk != B or Dk != D:
        raise ValueError(f"{name}: q {tuple(q.shape)} and k_cache {tuple(k_cache.shape)} disagree on batch or head dim")
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"{name}: query heads {Hq} must be a multiple of KV heads {Hkv}")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"{name}: head dim {D} must be in [1, {MAX_HEAD_DIM}]")
    if not isinstance(seq_lens, torch.Tensor) or seq_lens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: seq_lens must be an int32/int64 tensor, got {getattr(seq_lens, 'dtype', seq_lens)}")
    if tuple(seq_lens.shape) != (B,):
        raise ValueError(f"{name}: seq_lens has shape {tuple(seq_lens.shape)}; expected ({B},)")
    if scale is None:
        scale = D**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{name}: scale must be a finite number, got {scale!r}")
    if block_n is not None and (not isinstance(block_n, int) or block_n < 16 or block_n & (block_n - 1)):
        raise ValueError(f"{name}: block_n must be a power of two >= 16, got {block_n!r}")
    if num_splits is not None and (not isinstance(num_splits, int) or not 1 <= num_splits <= MAX_SPLITS):
        raise ValueError(f"{name}: num_splits must be an int in [1, {MAX_SPLITS}], got {num_splits!r}")
    check_device(_decode_split_kernel, name, q, k_cache, v_cache, seq_lens)

    out = torch.empty(B, 1, Hq, D, dtype=q.dtype, device=q.device).transpose(1, 2)  # [B, Hq, 1, D] view
    if out.numel() == 0:
        return out
    interp = interpreted(_decode_split_kernel)
    G = Hq // Hkv
    fp32 = q.dtype == torch.float32
    block_n = block_n or (32 if interp or fp32 else 64)  # fp32 tiles are twice the bytes: keep shared memory small
    splits = num_splits or _default_splits(q.device, B * Hkv, triton.cdiv(max(S, 1), block_n))
    block_d = max(16, triton.next_power_of_2(D))
    o_part = torch.empty(B, Hq, splits, D, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, Hq, splits, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(B, Hkv, splits)](
        q, k_cache, v_cache, seq_lens, o_part, lse,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        Hq, G, S, D, float(scale) * LOG2E, splits,
        BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_N=block_n, BLOCK_D=block_d, DOT_F32=interp,
        # numerics: fp32 inputs use exact fp32 dots on the GPU too (not TF32), as torch's default matmul does
        PRECISION="ieee" if fp32 or interp else "tf32", INTERPRET=interp,
        num_warps=4, num_stages=2 if fp32 else 3,
    )  # fmt: skip
    _decode_reduce_kernel[(B * Hq,)](
        o_part, lse, out, out.stride(0), out.stride(1), Hq, D, splits,
        BLOCK_S=max(2, triton.next_power_of_2(splits)), BLOCK_D=block_d, INTERPRET=interp, num_warps=4,
    )  # fmt: skip
    return out


def decode_attention_ref(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor, *, scale: float | None = None
) -> torch.Tensor:
    """The model's attention for one query per row: logits in the input dtype, softmax in fp32 (fp64 for fp64
    inputs), probabilities rounded to the input dtype before P @ V. Keys at or past seq_lens[b] are masked."""
    B, Hq, _, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    scale = D**-0.5 if scale is None else scale
    visible = torch.arange(S, device=q.device)[None, :] < seq_lens.to(q.device)[:, None]  # [B, S]
    qg = q.reshape(B, Hkv, Hq // Hkv, 1, D)  # [B, Hkv, G, 1, D]
    scores = torch.matmul(qg, k_cache[:, :, None].transpose(-1, -2)) * scale  # [B, Hkv, G, 1, S]
    scores = scores.masked_fill(~visible[:, None, None, None], float("-inf"))
    softmax_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    probs = torch.softmax(scores, dim=-1, dtype=softmax_dtype).nan_to_num(0.0).to(q.dtype)
    return torch.matmul(probs, v_cache[:, :, None]).reshape(B, Hq, 1, D)  # [B, Hq, 1, D]
