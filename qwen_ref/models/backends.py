"""The one place that decides which implementation of each op the model calls, once, at load time.

    rms_norm(x, weight, eps)                                 RMSNorm in HF's casting order
    attention(q, k, v, q_pos, window, scale)                 prefill: many queries per row (or no cache)
    decode_attention(q, k, v, q_pos, window, scale)          one query per row over its cached keys
    linear(x, layers)                                        x through each Linear layer that reads it
    silu_mul(gate, up)                                       the MLP's activation
    rope_qk(q, k, cos, signed_sin)                           rotary embedding of a layer's queries and keys
    attend_cached(q, groups, positions, window, scale)       a cached forward's attention over the cache's key
                                                             groups: attention or decode_attention per group

torch (models/torch_ops.py) is the reference. Triton (qwen_ref_kernels) replaces RMSNorm and attention;
the batch-invariant CPU kernel replaces the decode-step linears, and its backend (the default on the CPU) prefills
without the work above the diagonal (torch_ops.prefill_attention; bfloat16 and float16: the C++ flash attention,
qwen_ref_kernels/flash_prefill.py; bfloat16 on CPUs with AMX: torch's products and flash kernel, torch_bf16_prefill).
The rules that keep the reference's meaning:
float64 always runs the torch ops (it is the ground truth), and so do sliding-window layers (the Triton
kernels have no window).
"""

from __future__ import annotations

import functools
import logging
import os
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qwen_ref.errors import CheckpointError
from qwen_ref.models import torch_ops
from qwen_ref.models.kv_cache import KeyGroup, KVCache, RowCaches, WriteRows
from qwen_ref_kernels.invariant_linear import (  # the module needs no compiler until extension() builds it
    SUPPORTED_WEIGHT_DTYPES,
    InvariantLinearUnavailable,
    extension,
    linears_unchecked,
)

KERNELS = ("torch", "triton", "auto")
DECODE_LINEARS = ("auto", "torch", "invariant")

log = logging.getLogger("qwen_ref")

# Prefill through the invariant kernel (each row's sums are the same in any call: the kernel is batch-invariant).
# float32: every prefill linear, KERNEL_PREFILL_ROWS rows per call; the kernel's 2 x 8 tiles beat float32 BLAS
# (Qwen2.5-0.5B shapes, 2 threads: one-shot prefill at 1.33x (512 tokens) and 1.15x (4,096) torch.mm's throughput
# on the same shapes, against 0.89 / 0.78 with BLAS; bench_prefill.py). bfloat16: chunks of up to
# BF16_KERNEL_ROWS tokens (the engine's default chunk); longer ones keep BLAS, whose large-M bfloat16 products are
# the faster (512 tokens in chunks of 32: 0.93 s against BLAS's 1.06; chunks of 64: 0.86 against 0.80).
# float16: as float32, every prefill linear (BLAS's float16 products have no fast kernel here: 32 rows of a step's
# linears took 432 ms against the kernel's 71; bench_invariant_linear.py --dtype float16).
KERNEL_PREFILL_ROWS = 64
BF16_KERNEL_ROWS = 32


@functools.cache
def torch_bf16_prefill() -> bool:
    """Whether bfloat16 prefill runs torch's products and attention instead of the kernels: on CPUs with AMX
    (Intel Xeon 4th generation on), where oneDNN's AMX products are far faster than the kernel's pair instruction.
    Measured on one (2 threads, Qwen2.5-0.5B shapes): a step's linears over 32 rows took 78 ms in BLAS against the
    kernel's 186; attention over 4,096 keys, torch's bfloat16 flash kernel 1.41 ms for 32 queries and 70 ms for
    4,096 against the C++ flash attention's 4.9 and 190 (on a Zen 5 without AMX the C++ one was 3x faster).
    A fixed property of the CPU, so a request's numbers do not depend on timings; decode steps keep the kernel."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # torch's own check, the one oneDNN's choice follows
    return bool(probe is not None and probe())

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, int | None, float], torch.Tensor]
AttendCached = Callable[[torch.Tensor, Sequence[KeyGroup], torch.Tensor, int | None, float], torch.Tensor]


@dataclass(frozen=True)
class Backends:
    name: str
    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    attention: Attend
    decode_attention: Attend
    linear: Callable[[torch.Tensor, Sequence[nn.Linear]], list[torch.Tensor]]
    silu_mul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    rope_qk: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    attend_cached: AttendCached
    # decode steps compute each row as it is computed alone, whatever else is in the batch
    batch_invariant: bool = False
    # one call that copies new keys or values into many rows' own caches (kv_cache.RowCaches); None: row by row
    write_rows: WriteRows | None = None
    # decode_layer(layer, x, fwd): a decoder layer's decode step in one call, with the numbers of the ops above, or
    # None where it does not apply (the layer then runs op by op)
    decode_layer: Callable[[nn.Module, torch.Tensor, Any], torch.Tensor | None] | None = None


def per_group(attention: Attend, decode_attention: Attend) -> AttendCached:
    """attend_cached as one call per key group: q [B, H, T, D] -> [B, H, T, D]. A group whose rows hold exactly
    their own keys needs no positions."""
    def attend(q, groups, positions, window, scale):
        op = decode_attention if q.shape[2] == 1 else attention
        outs = [op(q[g.first : g.end], g.k, g.v, None if g.exact_rows else positions[g.first : g.end], window, scale)
                for g in groups]
        return outs[0] if len(outs) == 1 else torch.cat(outs)  # [B, H, T, D]

    return attend


TORCH = Backends("torch", torch_ops.rms_norm, torch_ops.attention, torch_ops.attention, torch_ops.linear,
                 torch_ops.silu_mul, torch_ops.rope_qk, per_group(torch_ops.attention, torch_ops.attention))


def check_backend_options(kernels: str, decode_linear: str, device: torch.device, dtype: torch.dtype) -> None:
    """A typed error for options that cannot run on this device and dtype, before any weight is read."""
    if kernels not in KERNELS:
        raise CheckpointError(f"kernels: {kernels!r} is not supported; allowed: {', '.join(map(repr, KERNELS))}")
    if decode_linear not in DECODE_LINEARS:
        raise CheckpointError(f"decode_linear: {decode_linear!r} is not supported; allowed: "
                              f"{', '.join(map(repr, DECODE_LINEARS))}")
    if decode_linear == "invariant" and not invariant_runs(device, dtype):
        raise CheckpointError(f"decode_linear='invariant' runs on the CPU in float32, bfloat16 or float16; got device "
                              f"{device}, dtype {dtype}")
    _use_triton(kernels, device)


def invariant_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Where decode_linear="auto" means "invariant": the CPU kernel's device and dtypes."""
    return device.type == "cpu" and dtype in SUPPORTED_WEIGHT_DTYPES


def resolve_backends(model: nn.Module, *, kernels: str = "torch", decode_linear: str = "auto") -> Backends:
    """The backends for a loaded model on its device and dtype; a typed error when one cannot run there.
    decode_linear="auto" is "invariant" where the kernel runs and builds, else "torch" (the reason is logged)."""
    weight = model.lm_head.weight
    check_backend_options(kernels, decode_linear, weight.device, weight.dtype)
    if decode_linear == "auto":
        decode_linear = "invariant" if invariant_runs(weight.device, weight.dtype) and _builds() else "torch"
    names, ops = [], {}
    if _use_triton(kernels, weight.device):
        ops.update(_triton_ops())
        names.append("triton")
    if decode_linear == "invariant":
        attention = ops.get("attention", _invariant_prefill_attention)
        other_decode = ops.get("decode_attention", TORCH.decode_attention)
        ops.update(linear=_invariant_linear(model), silu_mul=_invariant_silu_mul, attention=attention,
                   rms_norm=ops.get("rms_norm", _invariant_rms_norm), rope_qk=_invariant_rope,
                   attend_cached=_invariant_rows(per_group(attention, other_decode)), batch_invariant=True,
                   write_rows=extension().write_rows)
        if "rms_norm" not in ops or ops["rms_norm"] is _invariant_rms_norm:  # every op of a layer is C++ here
            ops.update(decode_layer=_invariant_decode_layer)
        names.append("invariant")
    fields = {**_torch_fields(), **ops}
    if "attend_cached" not in ops:
        fields["attend_cached"] = per_group(fields["attention"], fields["decode_attention"])
    return Backends("+".join(names) or "torch", **fields)


def _torch_fields() -> dict:
    return {"rms_norm": TORCH.rms_norm, "attention": TORCH.attention, "decode_attention": TORCH.decode_attention,
            "linear": TORCH.linear, "silu_mul": TORCH.silu_mul, "rope_qk": TORCH.rope_qk}


def _invariant_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # one C++ call per RMSNorm, each row alone (sum of squares in a fixed order: invariant_linear.cpp rms_rows),
    # HF's casts; float32 rounding of torch_ops.rms_norm, not its bits
    if x.dtype not in SUPPORTED_WEIGHT_DTYPES or weight.dtype != x.dtype:
        return torch_ops.rms_norm(x, weight, eps)
    return extension().rms_norm_rows(x.reshape(-1, x.shape[-1]).contiguous(), weight, eps).view(x.shape)


def _invariant_prefill_attention(q, k, v, q_pos, window, scale):
    # bfloat16 and float16 prompts (queries that are the last T of their keys, no window) through the C++ flash
    # attention (qwen_ref_kernels/flash_prefill.py); bfloat16 only where the CPU has the pair instruction it is
    # built on, and torch's flash kernel where torch_bf16_prefill(); the rest torch_ops.prefill_attention
    if q_pos is None and window is None:
        if q.dtype == torch.bfloat16 and torch_bf16_prefill():
            return torch_ops.sdpa_prefill(q, k, v, scale)
        if (q.shape[-1] % 64 == 0 and q.device.type == "cpu"
                and (q.dtype == torch.float16 or (q.dtype == torch.bfloat16 and _native_bf16()))):
            from qwen_ref_kernels.flash_prefill import flash_prefill

            return flash_prefill(q, k, v, scale)
    return torch_ops.prefill_attention(q, k, v, q_pos, window, scale)


@functools.cache
def _native_bf16() -> bool:
    return bool(extension().native_bf16_pairs())


def _invariant_silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    # torch_ops.silu_mul_rowwise's bits (torch's silu, one call per row; one row: silu_mul) in one C++ call
    if gate.dim() != 3 or gate.device.type != "cpu":
        return torch_ops.silu_mul_rowwise(gate, up)
    return extension().silu_mul_rows(gate.contiguous(), up)


def _invariant_decode_layer(layer: nn.Module, x: torch.Tensor, fwd: Any) -> torch.Tensor | None:
    # a decode step's layer whose every op would be the invariant backend's C++ op: one C++ call running them in
    # the model's order (invariant_linear.cpp decode_layer), so a 24-layer step spends no Python between its ~30
    # small ops per layer. Adapters, sliding windows, padded caches and prefill keep the op-by-op path.
    plan = _DECODE_PLANS.get(layer)
    if plan is None:
        plan = _DECODE_PLANS[layer] = _decode_plan(layer, x.dtype)
    i, window, heads, scale, eps, params = plan
    cache = fwd.cache
    if x.shape[1] != 1 or fwd.lora is not None or window is not None or x.dtype != params[0].dtype:
        return None
    if isinstance(cache, RowCaches) and cache.write_rows is not None:
        caches = cache.caches
    elif isinstance(cache, KVCache) and cache.batch_size == 1:
        caches = [cache]
    else:
        return None
    ks, vs = [c.k[i] for c in caches], [c.v[i] for c in caches]
    if not all(t.is_contiguous() for t in ks) or not all(t.is_contiguous() for t in vs):
        return None
    return extension().decode_layer(x, params, eps, fwd.cos.contiguous(), fwd.sin.contiguous(), ks, vs,
                                    fwd.positions[:, 0].tolist(), heads, scale)


# per decoder layer, what decode_layer reads of it: the Parameters themselves (a merged adapter swaps their data,
# not them), looked up once instead of ~30 module attribute lookups a step
_DECODE_PLANS: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()


def _decode_plan(layer: nn.Module, dtype: torch.dtype) -> tuple:
    attn, mlp, none = layer.self_attn, layer.mlp, torch.empty(0, dtype=dtype)
    params = [layer.input_layernorm.weight, attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight,
              *(none if m.bias is None else m.bias for m in (attn.q_proj, attn.k_proj, attn.v_proj)),
              attn.o_proj.weight, layer.post_attention_layernorm.weight, mlp.gate_proj.weight, mlp.up_proj.weight,
              mlp.down_proj.weight]
    assert layer.input_layernorm.eps == layer.post_attention_layernorm.eps  # one config value
    return attn.layer_idx, attn.sliding_window, attn.num_heads, attn.scaling, layer.input_layernorm.eps, params


def _invariant_rope(q, k, cos, signed_sin):
    # one token per row: one C++ call for queries and keys, torch_ops.rope's bits
    if q.shape[2] != 1 or q.dtype not in SUPPORTED_WEIGHT_DTYPES or cos.dtype != q.dtype:
        return torch_ops.rope_qk(q, k, cos, signed_sin)
    q, k = extension().rope_qk(q, k, cos.contiguous(), signed_sin.contiguous())
    return q, k


def _use_triton(kernels: str, device: torch.device) -> bool:
    if kernels == "torch":
        return False
    try:
        import qwen_ref_kernels.rms_norm  # noqa: F401  (imports triton)
    except ImportError as e:
        if kernels == "auto":
            return False
        raise CheckpointError(f"kernels='triton' needs triton: pip install 'qwen-ref[kernels]' ({e})") from None
    if kernels == "auto":
        return device.type == "cuda"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise CheckpointError(f"kernels='triton' on {device} needs a CUDA device, or TRITON_INTERPRET=1 set "
                              "before the first import of qwen_ref_kernels (the Triton interpreter, for tests)")
    return True


def _triton_ops() -> dict:
    # the optional dependency's one boundary: triton is imported here, when a model asks for it
    from qwen_ref_kernels.attention import attention as flash_attention
    from qwen_ref_kernels.decode_attention import decode_attention as flash_decode
    from qwen_ref_kernels.rms_norm import rms_norm as triton_rms_norm

    def rms_norm(x, weight, eps):
        return torch_ops.rms_norm(x, weight, eps) if x.dtype == torch.float64 else triton_rms_norm(x, weight, eps)

    def attention(q, k, v, q_pos, window, scale):
        if window is not None or q.dtype == torch.float64:
            return torch_ops.attention(q, k, v, q_pos, window, scale)
        T, S = q.shape[2], k.shape[2]
        if q_pos is None and T == S:
            return flash_attention(q, k, v, causal=True, scale=scale)
        # row b's queries are the last T of its q_pos[b, -1] + 1 keys (bottom-right causal)
        kv_lens = q_pos[:, -1] + 1 if q_pos is not None else torch.full((q.shape[0],), S, device=q.device)
        return flash_attention(q, k, v, causal=True, scale=scale, kv_lens=kv_lens)

    def decode_attention(q, k, v, q_pos, window, scale):
        if window is not None or q.dtype == torch.float64:
            return torch_ops.attention(q, k, v, q_pos, window, scale)
        seq_lens = q_pos[:, 0] + 1 if q_pos is not None else torch.full((q.shape[0],), k.shape[2], device=q.device)
        return flash_decode(q, k, v, seq_lens, scale=scale)

    return {"rms_norm": rms_norm, "attention": attention, "decode_attention": decode_attention}


def _invariant_rows(other: AttendCached) -> AttendCached:
    from qwen_ref_kernels.invariant_attention import decode_attention_rows

    def attend(q, groups, positions, window, scale):
        # a decode step whose rows each hold exactly their own keys (a one-row cache, a padded cache whose rows
        # share a length, the engine's per-request caches): the C++ decode attention, one call for all rows, each
        # row's numbers those of the row alone. Padded rows (positions) and sliding windows keep the other path.
        if q.shape[2] != 1 or window is not None or not all(g.exact_rows and g.k.stride(-1) == 1 for g in groups):
            return other(q, groups, positions, window, scale)
        return decode_attention_rows(q, [g.k for g in groups], [g.v for g in groups], scale)

    return attend


def _builds() -> bool:
    try:
        extension()
    except InvariantLinearUnavailable as e:
        log.warning("decode_linear='auto' uses torch's linears: %s", e)
        return False
    return True


def _invariant_linear(model: nn.Module) -> Callable[[torch.Tensor, Sequence[nn.Linear]], list[torch.Tensor]]:
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            w = m.weight
            if w.device.type != "cpu" or w.dtype not in SUPPORTED_WEIGHT_DTYPES or not w.is_contiguous():
                raise CheckpointError(f"decode_linear='invariant' runs on the CPU in float32, bfloat16 or float16; "
                                      f"{name}.weight is {w.dtype} on {w.device}"
                                      f"{'' if w.is_contiguous() else ', not contiguous'}")
    try:
        extension()  # built (or found in the cache) now, so that a missing compiler shows at load time
    except InvariantLinearUnavailable as e:
        raise CheckpointError(f"decode_linear='invariant': {e}") from None

    def linear(x: torch.Tensor, layers: Sequence[nn.Linear]) -> list[torch.Tensor]:
        # one kernel call for all the layers: a decode step (one token per row), float32 and float16 prefill in
        # calls of KERNEL_PREFILL_ROWS rows, bfloat16 prefill chunks of up to BF16_KERNEL_ROWS tokens (none where
        # torch_bf16_prefill()); BLAS for the rest
        if x.dim() != 3 or (x.shape[1] != 1 and x.dtype == torch.bfloat16
                            and (x.shape[0] * x.shape[1] > BF16_KERNEL_ROWS or torch_bf16_prefill())):
            return torch_ops.linear(x, layers)
        B, T = x.shape[:2]
        rows = x.reshape(B * T, -1)  # [B*T, K]
        weights, biases = [m.weight for m in layers], [m.bias for m in layers]
        if len(rows) <= KERNEL_PREFILL_ROWS:
            ys = linears_unchecked(rows, weights, biases)  # [B*T, N_i]
        else:
            blocks = [linears_unchecked(rows[i : i + KERNEL_PREFILL_ROWS], weights, biases)
                      for i in range(0, len(rows), KERNEL_PREFILL_ROWS)]
            ys = [torch.cat(parts) for parts in zip(*blocks)]  # [B*T, N_i]
        return [y.view(B, T, -1) for y in ys]  # [B, T, N_i]

    return linear
