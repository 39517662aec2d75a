"""Prefill attention: a FlashAttention-2-style forward with online softmax, GQA and bottom-right causal masking.

    out[b, h] = softmax((q[b, h] @ k[b, h // G]^T) * scale + mask) @ v[b, h // G],   G = Hq // Hkv

The causal mask is aligned bottom-right, as in FlashAttention-2: the Tq queries are the *last* Tq positions of
the Tk keys, so query t sits at position Tk - Tq + t and sees keys 0 .. Tk - Tq + t. With kv_lens [B], row b has
kv_lens[b] keys (the rest of its Tk is ignored) and its queries are the last Tq positions of those: this serves
prefill after a cached prefix of a different length per row.

One program owns BLOCK_M queries of one head and streams that head's keys and values in BLOCK_N tiles, keeping
the running max m, the running sum l (both fp32, in the exp2 domain) and the fp32 accumulator in registers. Tiles
every query of the block sees whole run without masks; only the diagonal and the tail are masked. A row that sees
no key (only possible with kv_lens < Tq) outputs 0, as FlashAttention does.
"""

from __future__ import annotations

import inspect
import math

import torch
import triton
import triton.language as tl

from ._common import check_device, check_float, check_last_dim_contiguous, interpreted, round_to

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256


@triton.jit
def _attn_tiles(
    acc, l_i, m_i, q, q_pos,  # running state [BM, BD], [BM], [BM]; q [BM, BD]; positions of the queries [BM]
    k_base, v_base, stride_kt, stride_vt, kv_len, lo, hi, D, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for start in range(lo, hi, BLOCK_N):
        keys = start + offs_n
        k_ptrs = k_base + keys[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = v_base + keys[:, None] * stride_vt + offs_d[None, :]
        if MASKED or not EVEN_D:
            load_mask = (keys < kv_len)[:, None] & (offs_d < D)[None, :]
            k = tl.load(k_ptrs, mask=load_mask, other=0.0)  # [BN, BD]
            v = tl.load(v_ptrs, mask=load_mask, other=0.0)  # [BN, BD]
        else:  # a tile inside [0, kv_len) with an unpadded head dim: no masks in the hot loop
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        p_dtype = v.dtype
        if DOT_F32:  # the interpreter cannot multiply bf16; fp32 products of 16-bit inputs are exact anyway
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BM, BN] logits in log2 units
        if MASKED:
            visible = (keys < kv_len)[None, :]
            if CAUSAL:
                visible = visible & (keys[None, :] <= q_pos[:, None])
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays at 0
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        # numerics: P is rounded to V's dtype before P @ V (the model rounds its probabilities to q's dtype);
        # here P is unnormalised (max 1) and the fp32 accumulator is divided by l at the end
        p = round_to(p, p_dtype, INTERPRET)
        if DOT_F32:
            p = p.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, kv_lens_ptr,  # q/o [B, Hq, Tq, D], k/v [B, Hkv, Tk, D], kv_lens [B]
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    Hq, G, Tq, Tk, D, qk_scale,
    CAUSAL: tl.constexpr, HAS_KV_LENS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    kvh = h // G  # GQA: query head h reads KV head h // G
    kv_len = Tk
    if HAS_KV_LENS:
        kv_len = tl.minimum(tl.maximum(tl.load(kv_lens_ptr + b).to(tl.int32), 0), Tk)  # clamped: memory-safe

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m < Tq)[:, None] & (offs_d < D)[None, :]
    q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=q_mask, other=0.0)  # [BM, BD]
    if DOT_F32:
        q = q.to(tl.float32)
    k_base = k_ptr + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh

    q_pos = kv_len - Tq + offs_m  # bottom-right: the queries are the last Tq positions of this row's keys
    first_pos = kv_len - Tq + pid_m * BLOCK_M
    if CAUSAL:
        hi = tl.minimum(kv_len, first_pos + BLOCK_M)  # the block's last query sees keys < hi
        hi_full = tl.maximum(tl.minimum(kv_len, first_pos + 1), 0) // BLOCK_N * BLOCK_N  # every query sees these
    else:
        hi = kv_len
        hi_full = kv_len // BLOCK_N * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, l_i, m_i = _attn_tiles(
        acc, l_i, m_i, q, q_pos, k_base, v_base, stride_kt, stride_vt, kv_len, 0, hi_full, D, qk_scale,
        False, CAUSAL, BLOCK_N, BLOCK_D, EVEN_D, DOT_F32, PRECISION, INTERPRET,
    )  # fmt: skip
    acc, l_i, m_i = _attn_tiles(
        acc, l_i, m_i, q, q_pos, k_base, v_base, stride_kt, stride_vt, kv_len, hi_full, hi, D, qk_scale,
        True, CAUSAL, BLOCK_N, BLOCK_D, EVEN_D, DOT_F32, PRECISION, INTERPRET,
    )  # fmt: skip

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # rows that saw nothing have acc = 0 and give 0
    o_base = o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(
        o_base + offs_m[:, None] * stride_ot + offs_d[None, :], round_to(out, o_ptr.dtype.element_ty, INTERPRET),
        mask=q_mask,
    )


# 16-bit inputs on a GPU: the block shape is tuned once per (head dim, causal, dtypes), about four compiles; the
# choice is cached on disk where this triton supports it. Explicit block sizes bypass the tuner.
_TUNED = [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)]  # (BLOCK_M, BLOCK_N, warps, stages)
_attn_fwd_tuned = triton.autotune(
    [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in _TUNED],
    key=["BLOCK_D", "CAUSAL"],
    **({"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}),
)(_attn_fwd_kernel)


def fixed_config(fp32: bool, interp: bool, block_d: int, block_m: int | None = None, block_n: int | None = None):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) when the tuner is not used: the interpreter, explicit block sizes,
    and fp32, whose exact fp32 dots run on FMA units (no tensor cores), so one small tile saves shared memory and
    compile time."""
    bm = block_m or (32 if interp else 64 if fp32 else 128)
    bn = block_n or (32 if interp or fp32 else 64)
    return bm, bn, 8 if bm * block_d >= 128 * 128 else 4, 2 if fp32 else 3


def _check_block(name: str, arg: str, value: int) -> None:
    if not isinstance(value, int) or value < 16 or value & (value - 1):
        raise ValueError(f"{name}: {arg} must be a power of two >= 16, got {value!r}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    kv_lens: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Attention of q [B, Hq, Tq, D] over k, v [B, Hkv, Tk, D]; returns [B, Hq, Tq, D] in q's dtype.

    The result is a [B, Hq, Tq, D] view of a [B, Tq, Hq, D] buffer, so `.transpose(1, 2).reshape(B, Tq, -1)`
    is free. kv_lens [B] (int32/int64, on q's device) gives each row's key count; values are clamped to [0, Tk].
    """
    name = "attention"
    for arg, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
        check_float(name, arg, t)
        if t.dim() != 4:
            raise ValueError(f"{name}: {arg} must be 4-D [B, H, T, D], got shape {tuple(t.shape)}")
        check_last_dim_contiguous(name, arg, t)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{name}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, Hq, Tq, D = q.shape
    Bk, Hkv, Tk, Dk = k.shape
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"{name}: v has shape {tuple(v.shape)}; expected k's shape {tuple(k.shape)}")
    if Bk != B or Dk != D:
        raise ValueError(f"{name}: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head dim")
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"{name}: query heads {Hq} must be a multiple of KV heads {Hkv}")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"{name}: head dim {D} must be in [1, {MAX_HEAD_DIM}]")
    if causal and kv_lens is None and Tq > Tk:
        raise ValueError(f"{name}: causal attention needs Tq <= Tk (queries are the last Tq keys), got {Tq} > {Tk}")
    if scale is None:
        scale = D**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{name}: scale must be a finite number, got {scale!r}")
    if kv_lens is not None:
        if not isinstance(kv_lens, torch.Tensor) or kv_lens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name}: kv_lens must be an int32/int64 tensor, got {getattr(kv_lens, 'dtype', kv_lens)}")
        if tuple(kv_lens.shape) != (B,):
            raise ValueError(f"{name}: kv_lens has shape {tuple(kv_lens.shape)}; expected ({B},)")
    for arg, value in (("block_m", block_m), ("block_n", block_n)):
        if value is not None:
            _check_block(name, arg, value)
    extra = () if kv_lens is None else (kv_lens,)
    check_device(_attn_fwd_kernel, name, q, k, v, *extra)

    out = torch.empty(B, Tq, Hq, D, dtype=q.dtype, device=q.device).transpose(1, 2)  # [B, Hq, Tq, D] view
    if out.numel() == 0:
        return out
    interp = interpreted(_attn_fwd_kernel)
    args = (
        q, k, v, out, kv_lens if kv_lens is not None else q,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        Hq, Hq // Hkv, Tq, Tk, D, float(scale) * LOG2E,
    )  # fmt: skip
    block_d = max(16, triton.next_power_of_2(D))
    meta = dict(
        CAUSAL=bool(causal), HAS_KV_LENS=kv_lens is not None, BLOCK_D=block_d, EVEN_D=block_d == D,
        # numerics: fp32 inputs use exact fp32 dots on the GPU too (not TF32), as torch's default matmul does
        DOT_F32=interp, PRECISION="ieee" if q.dtype == torch.float32 or interp else "tf32", INTERPRET=interp,
    )  # fmt: skip
    fp32 = q.dtype == torch.float32
    if interp or block_m or block_n or fp32:
        bm, bn, warps, stages = fixed_config(fp32, interp, block_d, block_m, block_n)
        grid = (triton.cdiv(Tq, bm), B * Hq)
        _attn_fwd_kernel[grid](*args, BLOCK_M=bm, BLOCK_N=bn, **meta, num_warps=warps, num_stages=stages)
    else:
        _attn_fwd_tuned[lambda cfg: (triton.cdiv(Tq, cfg["BLOCK_M"]), B * Hq)](*args, **meta)
    return out


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    kv_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """The model's attention in PyTorch: logits in the input dtype, softmax in fp32 (fp64 for fp64 inputs),
    probabilities rounded to the input dtype before P @ V. Rows that see no key give 0."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    lens = torch.full((B,), Tk, device=q.device) if kv_lens is None else kv_lens.to(q.device).clamp(0, Tk)
    keys = torch.arange(Tk, device=q.device)
    visible = keys[None, None, :] < lens[:, None, None]  # [B, 1, Tk]
    if causal:
        q_pos = lens[:, None] - Tq + torch.arange(Tq, device=q.device)  # [B, Tq], bottom-right
        visible = visible & (keys[None, None, :] <= q_pos[:, :, None])  # [B, Tq, Tk]
    qg = q.reshape(B, Hkv, G, Tq, D)  # [B, Hkv, G, Tq, D]: query head h = kv_head * G + g
    scores = torch.matmul(qg, k[:, :, None].transpose(-1, -2)) * scale  # [B, Hkv, G, Tq, Tk]
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    softmax_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    probs = torch.softmax(scores, dim=-1, dtype=softmax_dtype).nan_to_num(0.0).to(q.dtype)
    return torch.matmul(probs, v[:, :, None]).reshape(B, Hq, Tq, D)  # [B, Hq, Tq, D]
