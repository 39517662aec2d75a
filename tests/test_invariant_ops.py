"""The invariant backend's C++ RMSNorm and rotary embedding (qwen_ref_kernels/invariant_linear.cpp).

rope_qk is torch_ops.rope bit for bit: the same products and sum, each rounded to the dtype as torch's elementwise
ops round them. rms_norm_rows sums the squares in its own fixed order, so it is torch_ops.rms_norm (HF's) up to
float rounding: its error against float64 may be at most 1.5x that of torch_ops.rms_norm plus one rounding unit
at the output scale (in bfloat16 and float16 both are dominated by the final casts, and measured equal).
"""

from __future__ import annotations

import pytest
import torch

from qwen_ref.models import torch_ops
from qwen_ref_kernels.invariant_linear import extension


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("H", "KV", "D"), [(14, 2, 64), (40, 8, 128), (7, 7, 80)])
def test_rope_is_torch_ops_rope_bit_for_bit(dtype, H, KV, D):
    g = torch.Generator().manual_seed(D)
    B = 3
    qkv = (torch.randn(B, 1, (H + 2 * KV) * D, generator=g) * 30).to(dtype)  # the fused projection's output
    q = qkv[..., : H * D].view(B, 1, H, D).transpose(1, 2)  # [B, H, 1, D], strided as in the model
    k = qkv[..., H * D : (H + KV) * D].view(B, 1, KV, D).transpose(1, 2)
    cos = torch.randn(B, 1, 1, D, generator=g).to(dtype)
    sin = torch_ops.rope_sin(torch.randn(B, 1, 1, D, generator=g).to(dtype))
    rq, rk = extension().rope_qk(q, k, cos, sin)
    assert torch.equal(rq, torch_ops.rope(q, cos, sin)) and torch.equal(rk, torch_ops.rope(k, cos, sin))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K", [896, 100, 27, 4864])
def test_rms_norm_error_is_that_of_hf_order(dtype, K):
    g = torch.Generator().manual_seed(K)
    x = (torch.randn(9, K, generator=g) * torch.logspace(-3, 3, 9)[:, None]).to(dtype)
    w = torch.randn(K, generator=g).to(dtype)
    ref = torch_ops.rms_norm(x.double(), w.double(), 1e-6)
    ours = (extension().rms_norm_rows(x, w, 1e-6).double() - ref).abs().max().item()
    hf = (torch_ops.rms_norm(x, w, 1e-6).double() - ref).abs().max().item()
    unit = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    assert ours <= 1.5 * hf + unit * ref.abs().max().item(), (ours, hf)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_rows_alone_and_zero_rows(dtype):
    x = torch.randn(33, 176).to(dtype)
    x[5] = 0  # a zero row normalises to zeros: 0 * (1 / sqrt(eps)), never NaN
    w = torch.randn(176).to(dtype)
    together = extension().rms_norm_rows(x, w, 1e-6)
    assert torch.equal(together[5], torch.zeros(176, dtype=dtype))
    for m in range(33):
        assert torch.equal(together[m : m + 1], extension().rms_norm_rows(x[m : m + 1].contiguous(), w, 1e-6))


def _replay_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_rows' documented order, one row, in numpy float32 steps. x holds bfloat16 values, so each x_i^2 + acc
    is exact in float64 and rounding it to float32 is the fused multiply-add's one rounding."""
    import numpy as np

    xs = x.double().numpy()
    K = xs.shape[0]
    whole = K - K % 16
    acc = np.zeros(16, dtype=np.float32)
    for i in range(whole):
        acc[i % 16] = np.float32(float(acc[i % 16]) + xs[i] * xs[i])
    for step in (8, 4, 2, 1):  # the fold: lane j += lane j ^ step, float32 adds
        acc = acc + acc[[j ^ step for j in range(16)]]
    ss = acc[0]
    for i in range(whole, K):
        ss = np.float32(float(ss) + xs[i] * xs[i])
    r = np.float32(1.0) / np.sqrt(ss / np.float32(K) + np.float32(eps))
    h = (x.float() * torch.tensor(r)).to(x.dtype)  # numerics: HF's casts
    return (w.float() * h.float()).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K", [896, 27, 100])
def test_rms_norm_is_its_documented_order(dtype, K):
    g = torch.Generator().manual_seed(K + 1)
    x = (torch.randn(4, K, generator=g) * 3).to(torch.bfloat16).to(dtype)  # bfloat16 values (see the replay): float16
    # holds them exactly down to 2**-14 (its subnormals keep 8 bits of a value to 2**-22)
    w = torch.randn(K, generator=g).to(dtype)
    ours = extension().rms_norm_rows(x, w, 1e-6)
    for m in range(4):
        assert torch.equal(ours[m], _replay_rms_norm(x[m], w, 1e-6))
