"""The C++ decode attention of the batch-invariant backend against its float64 reference and against itself alone.

Tolerances: the error against float64 may be at most 2x the BLAS path's (torch_ops.attention), plus sqrt(S) units
of rounding at the output scale. The values are summed over the S keys one after another, whose rounding errors
grow with the number of terms (like sqrt(S) for random data; measured at S = 2049 in float32: 2.4e-7 against
BLAS's 7.9e-8 at outputs of 0.16), where BLAS sums in blocks. In bfloat16 the output rounding dominates both."""

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
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_error_is_that_of_the_blas_path(H, KV, D, S, dtype):
    k, v = _cache_views(3, KV, S, D, dtype, seed=S)
    q = torch.randn(3, H, 1, D, generator=torch.Generator().manual_seed(H)).to(dtype)
    scale = D**-0.5
    ref = decode_attention_ref(q, k, v, scale)
    ours = (decode_attention(q, k, v, scale).double() - ref).abs().max().item()
    blas = (torch_ops.attention(q, k, v, None, None, scale).double() - ref).abs().max().item()
    unit = 2.0**-24 if dtype == torch.float32 else 2.0**-8
    assert ours <= 2 * blas + S**0.5 * unit * ref.abs().max().item(), (ours, blas)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
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
