"""The C++ decode attention of the batch-invariant backend against its float64 reference and against itself alone.

Tolerances: the error against float64 may be at most 2x the BLAS path's (torch_ops.attention), plus sqrt(S) units
of rounding at the output scale. The values are summed over the S keys one after another, whose rounding errors
grow with the number of terms (like sqrt(S) for random data; measured at S = 2049 in float32: 2.4e-7 against
BLAS's 7.9e-8 at outputs of 0.16), where BLAS sums in blocks. In bfloat16 and float16 the output rounding dominates
both."""

from __future__ import annotations

import pytest
import torch

from qwen_ref.models import torch_ops
from qwen_ref_kernels.invariant_attention import decode_attention, decode_attention_ref


def _cache_views(B, KV, S, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, KV, S + 9, D, generator=g).to(dtype)  # a cache with room left: views of its first S
    v = torch.randn(B, KV, S + 9, D, generator=g).to(dtype)
    return k[:, :, :S], v[:, :, :S]


SHAPES = [(14, 2, 64, 150), (16, 16, 64, 77), (40, 8, 128, 300), (7, 7, 80, 33), (12, 2, 128, 1), (28, 4, 128, 2049)]


@pytest.mark.parametrize(("H", "KV", "D", "S"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_error_is_that_of_the_blas_path(H, KV, D, S, dtype):
    k, v = _cache_views(3, KV, S, D, dtype, seed=S)
    q = torch.randn(3, H, 1, D, generator=torch.Generator().manual_seed(H)).to(dtype)
    scale = D**-0.5
    ref = decode_attention_ref(q, k, v, scale)
    ours = (decode_attention(q, k, v, scale).double() - ref).abs().max().item()
    blas = (torch_ops.attention(q, k, v, None, None, scale).double() - ref).abs().max().item()
    unit = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    assert ours <= 2 * blas + S**0.5 * unit * ref.abs().max().item(), (ours, blas)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_each_row_equals_the_row_alone(dtype):
    k, v = _cache_views(5, 2, 300, 64, dtype, seed=1)
    q = torch.randn(5, 14, 1, 64, generator=torch.Generator().manual_seed(2)).to(dtype)
    together = decode_attention(q, k, v, 0.125)
    for b in range(5):
        assert torch.equal(together[b : b + 1], decode_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], 0.125))


def test_values_sum_in_key_order():
    # out = sum over keys of p * v, key 0 first: a huge value then its negative cancel exactly, and the small
    # values after them survive; summed in another order they would be lost to rounding
    k = torch.zeros(1, 1, 4, 32)  # equal scores: p = 1/4 each
    v = torch.zeros(1, 1, 4, 32)
    v[0, 0, :, 0] = torch.tensor([1e30, -1e30, 3.0, 5.0])
    out = decode_attention(torch.zeros(1, 1, 1, 32), k, v, 1.0)
    assert out[0, 0, 0, 0].item() == 2.0  # (3 + 5) / 4


@pytest.mark.parametrize("D", [64, 128, 80])  # scales 1/8 (exact), 128**-0.5 and 80**-0.5 (rounded products)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rows_of_their_own_lengths_in_one_call(dtype, D):
    # the engine's rows each keep their own cache: one call attends each over its own keys, with exactly the
    # numbers of the documented per-row composition (head_scores, torch's scores * scale and float32 softmax,
    # weighted_rows); the call scales the scores as it writes them, and the keys past the last block of 16 after
    from qwen_ref_kernels.invariant_attention import decode_attention_rows
    from qwen_ref_kernels.invariant_linear import extension

    lengths = [1, 150, 37, 300, 150, 37]  # rows of the same length share the softmax calls
    rows = [_cache_views(1, 2, S, D, dtype, seed=S + i) for i, S in enumerate(lengths)]
    ks, vs = [k for k, _ in rows], [v for _, v in rows]  # [1, KV, S_b, D], views of a cache with room left
    q = torch.randn(len(lengths), 14, 1, D, generator=torch.Generator().manual_seed(9)).to(dtype)
    scale = D**-0.5
    together = decode_attention_rows(q, ks, vs, scale)
    ext = extension()
    for b in range(len(lengths)):
        scores = ext.head_scores(q[b].reshape(2, 7, D).contiguous(), ks[b][0])  # [KV, G, S_b]
        probs = torch.softmax(scores * scale, dim=-1, dtype=torch.float32).to(dtype)
        alone = ext.weighted_rows(probs, vs[b][0]).view(14, 1, D)
        assert torch.equal(together[b], alone)


@pytest.mark.parametrize("T", [1, 3])
def test_write_rows_fills_each_rows_cache_as_its_own_update(T):
    # RowCaches with the kernel's one-call writer: the same caches, lengths and key groups as row-by-row writes
    from qwen_ref.config import QwenConfig
    from qwen_ref.models.kv_cache import KVCache, RowCaches
    from qwen_ref_kernels.invariant_linear import extension

    config = QwenConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    results = []
    for writer in (None, extension().write_rows):
        caches = [KVCache(config, 1, cap, dtype=torch.bfloat16) for cap in (10, 40, 7)]
        for c, n in zip(caches, (3, 30, 4)):
            c.advance(n)
        rows = RowCaches(caches, writer)
        g = torch.Generator().manual_seed(T)
        k, v = (torch.randn(3, 2, T, 16, generator=g).to(torch.bfloat16) for _ in range(2))
        groups = rows.update(1, rows.positions(T), k, v)
        results.append((caches, groups))
    (plain, plain_groups), (fast, fast_groups) = results
    for a, b in zip(plain, fast):
        assert all(torch.equal(x, y) for x, y in zip(a.k + a.v, b.k + b.v))
    for a, b in zip(plain_groups, fast_groups):
        assert (a.first, a.end, a.exact_rows) == (b.first, b.end, b.exact_rows)
        assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)


@pytest.mark.parametrize(("G", "D", "S"), [(7, 64, 8192 + 5), (1, 128, 48), (5, 80, 37), (4, 96, 15), (2, 64, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_head_scores_are_the_linears_sums(G, D, S, dtype):
    # scores[h] = q[h] k[h]^T in invariant_linear's documented order, bit for bit, whether the keys go through the
    # 16-key blocks or the linear's own tiles (keys past the last block of 16, or head sizes off the step)
    from qwen_ref_kernels.invariant_linear import extension

    ext = extension()
    g = torch.Generator().manual_seed(S)
    q = torch.randn(2, G, D, generator=g).to(dtype)
    k = torch.randn(2, S + 3, D, generator=g).to(dtype)[:, :S]  # a cache's view: rows contiguous
    if S > 16:
        q[1, 0, 3] = float("nan")  # NaN scores: the same bits (0x7FC0 in bfloat16, 0x7E00 in float16) on both paths
    scores = ext.head_scores(q, k)
    for h in range(2):
        linear = ext.linears(q[h].contiguous(), [k[h].contiguous()], [torch.empty(0, dtype=dtype)])[0]  # [G, S]
        bits = torch.int32 if dtype == torch.float32 else torch.int16  # bfloat16, float16
        assert torch.equal(scores[h].view(bits), linear.view(bits))


@pytest.mark.parametrize(("G", "D"), [(7, 64), (8, 64), (12, 128), (3, 80)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_values_of_a_query_head_do_not_depend_on_the_heads_beside_it(G, D, dtype):
    # up to 7 query heads per KV head take whole rows of values in one pass, more take them 32 columns at a time,
    # and 1 head alone takes its own path: each (head, column) sum is the same key-order sequence in all of them
    from qwen_ref_kernels.invariant_linear import extension

    ext = extension()
    g = torch.Generator().manual_seed(G * D)
    S = 300
    probs = torch.softmax(torch.randn(2, G, S, generator=g), -1).to(dtype)  # [KV, G, S]
    v = torch.randn(2, S + 5, D, generator=g).to(dtype)[:, :S]  # a cache's view: rows contiguous
    together = ext.weighted_rows(probs, v)  # [KV, G, D]
    for h in range(G):
        alone = ext.weighted_rows(probs[:, h : h + 1].contiguous(), v)
        assert torch.equal(together[:, h : h + 1], alone), h


def test_groups_of_several_rows_and_single_rows_in_one_call():
    # a padded cache's group (rows sharing a length) beside rows with their own caches, as one call: each row's
    # bits are its bits alone
    from qwen_ref_kernels.invariant_attention import decode_attention_rows

    kA, vA = _cache_views(2, 2, 40, 64, torch.bfloat16, seed=1)  # [2, KV, 40, D]
    kB, vB = _cache_views(1, 2, 9, 64, torch.bfloat16, seed=2)
    q = torch.randn(3, 14, 1, 64, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    together = decode_attention_rows(q, [kA, kB], [vA, vB], 0.125)
    assert torch.equal(together[:1], decode_attention(q[:1], kA[:1], vA[:1], 0.125))
    assert torch.equal(together[1:2], decode_attention(q[1:2], kA[1:], vA[1:], 0.125))
    assert torch.equal(together[2:], decode_attention(q[2:], kB, vB, 0.125))
