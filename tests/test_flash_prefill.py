"""The C++ flash attention for bfloat16 and float16 prefill (qwen_ref_kernels/flash_prefill.py) against float64 and
itself.

Tolerance: the error against float64 may be at most 1.5x that of HF's eager attention in the same dtype
(torch_ops.attention, which rounds the scores to the dtype where this kernel keeps them in float32; measured about
half of it) plus 4 units of the dtype's rounding at the output scale. A wrong mask, key range, GQA head or
rescaling is an error of the order of the outputs. Bits: a query's numbers depend only on its row and position, so
batches, chunks and tiles of queries are checked bit for bit, and an independent replay of the documented steps
gives every bit.
"""

from __future__ import annotations

import pytest
import torch
from flash_prefill_replay import F32, fma32, replay

from qwen_ref.models import torch_ops
from qwen_ref_kernels.flash_prefill import flash_prefill, flash_prefill_ref
from qwen_ref_kernels.invariant_linear import extension

DTYPES = [torch.bfloat16, torch.float16]
UNIT = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # a rounding unit of the output


def _qkv(B, H, KV, T, S, D, seed, scale=1.0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, T, H, D, generator=g) * scale).to(dtype).transpose(1, 2)  # [B, H, T, D] as the model's
    k = (torch.randn(B, KV, S + 5, D, generator=g) * scale).to(dtype)[:, :, :S]  # a cache's view with room left
    v = torch.randn(B, KV, S + 5, D, generator=g).to(dtype)[:, :, :S]
    return q, k, v


# (H, KV, T, S, D): whole prompts (T == S) and chunks after the first (T < S); GQA and MHA; head sizes 64 and 128;
# T not a multiple of the 6-query tiles, S not a multiple of the 64-key blocks, odd S, one query, one key
SHAPES = [(14, 2, 300, 300, 64), (16, 16, 200, 200, 64), (40, 8, 130, 130, 128), (14, 2, 96, 700, 64),
          (14, 2, 1, 9, 64), (14, 2, 32, 32, 64), (2, 1, 7, 7, 64), (2, 2, 1, 1, 128), (4, 2, 65, 129, 64)]


def _assert_within_eager(out, q, k, v, scale, ref):
    # the tolerance in this file's docstring: 1.5x eager's error, plus 4 rounding units at the output scale
    ours = (out.double() - ref).abs().max().item()
    eager = (torch_ops.attention(q, k, v, None, None, scale).double() - ref).abs().max().item()
    assert ours <= 1.5 * eager + 4 * UNIT[q.dtype] * ref.abs().max().item(), (ours, eager)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("H", "KV", "T", "S", "D"), SHAPES)
def test_error_is_within_that_of_the_eager_path(H, KV, T, S, D, dtype):
    q, k, v = _qkv(2, H, KV, T, S, D, seed=T + S, dtype=dtype)
    scale = D**-0.5
    ref = flash_prefill_ref(q, k, v, scale)
    eager64 = torch_ops.attention(q.double(), k.double(), v.double(), None, None, scale)
    torch.testing.assert_close(ref, eager64, rtol=0, atol=1e-12)  # the reference is the model's attention
    out = flash_prefill(q, k, v, scale)
    assert out.shape == q.shape and out.dtype == dtype
    _assert_within_eager(out, q, k, v, scale, ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_peaked_scores_and_a_running_maximum_that_moves(dtype):
    # large scores (the softmax near one-hot) and rows whose largest score comes late, after blocks whose maximum
    # was smaller: the running rescaling must carry the early blocks exactly
    q, k, v = _qkv(1, 4, 2, 200, 200, 64, seed=3, scale=3.0, dtype=dtype)
    k[:, :, 150:] *= 4  # later keys score higher
    scale = 64**-0.5
    _assert_within_eager(flash_prefill(q, k, v, scale), q, k, v, scale, flash_prefill_ref(q, k, v, scale))


@pytest.mark.parametrize("dtype", DTYPES)
def test_chunks_of_a_prompt_give_the_one_pass_bits(dtype):
    # the engine prefills in chunks at fixed offsets: each chunk's queries are the last T of the keys so far, and
    # a query's numbers are those of the whole prompt in one pass, bit for bit (any chunk size, any tile)
    q, k, v = _qkv(1, 14, 2, 250, 250, 64, seed=1, dtype=dtype)
    whole = flash_prefill(q, k, v, 0.125)
    for chunk in (32, 7, 64, 1):
        parts = [flash_prefill(q[:, :, t : t + chunk], k[:, :, : t + chunk], v[:, :, : t + chunk], 0.125)
                 for t in range(0, 250, chunk)]
        assert torch.equal(torch.cat(parts, dim=2).view(torch.int16), whole.view(torch.int16)), chunk  # -0 too


def test_fma_emulation_of_the_replay_is_exact():
    from fractions import Fraction

    import numpy as np

    rng = np.random.default_rng(0)
    a, b, c = ((rng.standard_normal(3000) * np.exp2(rng.integers(-40, 40, 3000))).astype(F32) for _ in range(3))
    c[1000:2000] = (-(a[1000:2000].astype(np.float64) * b[1000:2000])).astype(F32)  # near-cancellations
    got = fma32(a, b, c)
    for x, y, z, r in zip(a, b, c, got):
        exact = Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z))
        near = [np.nextafter(r, F32(-np.inf)), r, np.nextafter(r, F32(np.inf))]
        assert abs(Fraction(float(r)) - exact) <= min(abs(Fraction(float(n)) - exact) for n in near)


# (B, H, KV, T, S, D, input scale): one key, tiles of 6 queries that end inside a block of 64 keys, chunks after the
# first, head size 128, large inputs (peaked softmax rows, a running maximum that moves between blocks)
REPLAYED = [(1, 2, 1, 1, 1, 64, 1.0), (1, 2, 1, 7, 7, 64, 1.0), (1, 2, 1, 13, 70, 64, 1.0),
            (1, 2, 1, 65, 130, 64, 1.0), (1, 2, 1, 3, 200, 64, 1.0), (1, 2, 1, 20, 140, 128, 1.0),
            (1, 2, 1, 70, 200, 64, 4.0), (2, 4, 2, 2, 2, 64, 1.0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("B", "H", "KV", "T", "S", "D", "big"), REPLAYED)
def test_the_documented_numbers_bit_for_bit(B, H, KV, T, S, D, big, dtype):
    # an independent float32 replay of the module docstring's steps (tests/flash_prefill_replay.py) gives every bit,
    # the signs of zeros included
    g = torch.Generator().manual_seed(T * S)
    q = (torch.randn(B, H, T, D, generator=g) * big).to(dtype)
    k = (torch.randn(B, KV, S, D, generator=g) * big).to(dtype)
    v = torch.randn(B, KV, S, D, generator=g).to(dtype)
    if big > 1:
        k[:, :, S // 2 :] *= 4  # later keys score higher: the running maximum moves
    want = replay(*(t.float().numpy() for t in (q, k, v)), D**-0.5, half=dtype == torch.float16)
    got = flash_prefill(q, k, v, D**-0.5).float().numpy()
    assert (got.view("uint32") == want.view("uint32")).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_key_past_a_querys_position_reaches_it(dtype):
    # values so small that every product flushes or underflows (the sums are zeros, their signs set by the keys
    # summed) and an infinite value at key 5: queries 0-4 must not see either, in one call or alone (0 * inf would
    # be NaN)
    q, k, v = _qkv(1, 2, 1, 13, 13, 64, seed=4, dtype=dtype)
    v = v * (2.0**-120 if dtype == torch.bfloat16 else 2.0**-20)
    v[0, 0, 5, 3] = float("inf")
    together = flash_prefill(q, k, v, 0.125)
    assert torch.isfinite(together[:, :, :5]).all() and not torch.isfinite(together[:, :, 5:, 3]).all()
    for t in range(13):
        alone = flash_prefill(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], 0.125)
        assert torch.equal(alone.view(torch.int16), together[:, :, t : t + 1].view(torch.int16)), t
    want = replay(*(t.float().numpy() for t in (q, k, v)), 0.125, half=dtype == torch.float16)
    assert (together.float().numpy().view("uint32") == want.view("uint32")).all()


def test_each_row_equals_the_row_alone():
    q, k, v = _qkv(3, 14, 2, 100, 140, 64, seed=2)
    together = flash_prefill(q, k, v, 0.125)
    for b in range(3):
        assert torch.equal(together[b : b + 1], flash_prefill(q[b : b + 1], k[b : b + 1], v[b : b + 1], 0.125))


def test_bad_inputs_name_the_problem():
    q, k, v = _qkv(1, 4, 2, 8, 8, 64, seed=0)
    with pytest.raises(ValueError, match=r"q is torch\.float32 on cpu; it takes bfloat16 or float16"):
        flash_prefill(q.float(), k, v, 0.125)
    with pytest.raises(ValueError, match=r"k is torch\.float16 on cpu; it takes bfloat16 or float16 \(as q\)"):
        flash_prefill(q, k.half(), v, 0.125)
    with pytest.raises(ValueError, match=r"do not fit"):
        flash_prefill(q[..., :32], k[..., :32], v[..., :32], 0.125)  # D = 32
    with pytest.raises(ValueError, match=r"do not fit"):
        flash_prefill(q, k[:, :, :4], v[:, :, :4], 0.125)  # T > S
    with pytest.raises(ValueError, match=r"do not fit"):
        flash_prefill(q, k[:, :0], v[:, :0], 0.125)  # no KV heads
    with pytest.raises(ValueError, match=r"do not fit"):
        flash_prefill(q[..., :0], k[..., :0], v[..., :0], 0.125)  # D = 0
    with pytest.raises(ValueError, match=r"scale must be a number, got str"):
        flash_prefill(q, k, v, "0.125")
    with pytest.raises(ValueError, match=r"v must be a 4-d tensor"):
        flash_prefill(q, k, v[0], 0.125)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_the_default_backend_prefills_with_it(tiny, monkeypatch, dtype):
    import qwen_ref
    from qwen_ref.models import backends
    from qwen_ref_kernels import flash_prefill as module

    model = qwen_ref.load(tiny("qwen2.5-coder-32b-shape"), dtype=dtype).model  # head size 128
    if model.backends.name != "invariant" or (dtype == "bfloat16" and not extension().native_bf16_pairs()):
        pytest.skip("the C++ flash attention runs in the invariant backend (bfloat16: on CPUs with avx512_bf16)")
    monkeypatch.setattr(backends, "torch_bf16_prefill", lambda: False)  # a CPU without AMX (test_prefill_attention.py)
    calls = []
    monkeypatch.setattr(module, "flash_prefill", lambda *a: calls.append(a[0].shape) or flash_prefill(*a))
    with torch.inference_mode():
        model(torch.arange(3, 43)[None], cache=model.new_cache(1, 40))
    assert calls == [(1, model.config.num_attention_heads, 40, model.config.head_dim)] * model.config.num_hidden_layers
