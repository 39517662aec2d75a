"""Triton kernels against their PyTorch references.

Without CUDA the kernels run on CPU tensors in the Triton interpreter. Triton reads TRITON_INTERPRET when a kernel
is decorated, i.e. when qwen_ref_kernels is imported, so this module sets it before that import. The tolerance
rule (flash-attention's): the kernel's max error against an fp64 reference is at most twice the error of the
PyTorch reference computed in the kernel's dtype, plus a small atol.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="the kernels need triton (pip install qwen-ref[kernels])")
import qwen_ref_kernels as K  # noqa: E402

if not CUDA and not K.INTERPRET:
    raise RuntimeError(
        "no GPU, and qwen_ref_kernels was imported without TRITON_INTERPRET=1 (unset, 0, or set after an earlier "
        "import): its kernels cannot run here"
    )

DEVICE = "cuda" if CUDA else "cpu"
ROOT = Path(__file__).resolve().parents[1]
ATOL = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def assert_within_2x_torch(out: torch.Tensor, out_pt: torch.Tensor, out_ref: torch.Tensor, atol: float) -> None:
    """max|out - ref| <= 2 * max|out_pt - ref| + atol, with ref in fp64 and out_pt PyTorch in out's dtype."""
    assert out.shape == out_ref.shape and out.dtype == out_pt.dtype
    assert torch.isfinite(out).all(), "kernel output has NaN/inf"
    err = (out.double() - out_ref).abs().max().item()
    err_pt = (out_pt.double() - out_ref).abs().max().item()
    worst = (out.double() - out_ref).abs().flatten().argmax().item()
    assert err <= 2 * err_pt + atol, (
        f"kernel error {err:.3e} > 2 x torch error {err_pt:.3e} + atol {atol:.0e} "
        f"(worst at flat index {worst}: kernel {out.flatten()[worst].item()}, ref {out_ref.flatten()[worst].item()})"
    )


def randn(*shape, dtype=torch.float32, device=DEVICE):
    return torch.randn(*shape, device=device).to(dtype)


# ---------------------------------------------------------------------------------------------------- RMSNorm


def check_rms_norm(x, w, eps, residual=None, atol=None):
    atol = ATOL[x.dtype] if atol is None else atol
    ref_args = (x.double(), w.double(), eps) + (() if residual is None else (residual.double(),))
    if residual is None:
        assert_within_2x_torch(K.rms_norm(x, w, eps), K.rms_norm_ref(x, w, eps), K.rms_norm_ref(*ref_args), atol)
        return
    out, h = K.rms_norm(x, w, eps, residual=residual)
    out_pt, h_pt = K.rms_norm_ref(x, w, eps, residual=residual)
    out_ref, _ = K.rms_norm_ref(*ref_args)
    assert torch.equal(h, h_pt), "x + residual must equal torch's add in the activation dtype exactly"
    assert_within_2x_torch(out, out_pt, out_ref, atol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 123), (2, 3, 896), (1, 3000), (4, 1, 64), (7,)], ids=str)
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "residual"])
def test_rms_norm(shape, dtype, fused):
    n = shape[-1]
    x = randn(*shape, dtype=dtype) * 3
    w = (1 + 0.5 * randn(n)).to(dtype)
    check_rms_norm(x, w, 1e-6, randn(*shape, dtype=dtype) if fused else None)


def test_rms_norm_matches_torch_bit_for_bit_in_16_bit():
    # one rounding per step in HF's order: the kernel reproduces torch exactly except for rare rstd-ulp flips
    x = randn(6, 896, dtype=torch.bfloat16)
    w = (1 + 0.5 * randn(896)).to(torch.bfloat16)
    mismatch = (K.rms_norm(x, w, 1e-6) != K.rms_norm_ref(x, w, 1e-6)).float().mean().item()
    assert mismatch < 1e-3


def test_rms_norm_strided_rows_and_weight_promotion():
    base = randn(2, 3, 160, dtype=torch.float16)
    x = base[..., :123]  # rows with stride 160: viewable as [M, N] without a copy
    check_rms_norm(x, (1 + randn(123)).to(torch.float16), 1e-5)
    w32 = 1 + randn(123)  # an fp32 weight promotes the output to fp32, as HF's weight * h.to(dtype) does
    out = K.rms_norm(x, w32, 1e-5)
    assert out.dtype == torch.float32
    assert_within_2x_torch(out, K.rms_norm_ref(x, w32, 1e-5), K.rms_norm_ref(x.double(), w32.double(), 1e-5), 1e-6)


def test_rms_norm_empty_and_zero_rows():
    assert K.rms_norm(randn(0, 64), torch.ones(64, device=DEVICE), 1e-6).shape == (0, 64)
    out = K.rms_norm(torch.zeros(3, 64, device=DEVICE), torch.ones(64, device=DEVICE), 1e-6)
    assert torch.equal(out, torch.zeros_like(out))


# --------------------------------------------------------------------------------------------------- attention

# (B, Hq, Hkv, Tq, Tk, D, causal, kv_lens, block_m, block_n): GQA ratios 1, 2, 5, 7; Tq = 1; Tq < Tk; lengths
# that are not multiples of the block; head dims 8 (padded to 16), 16, 64, 128; ragged rows via kv_lens.
ATTN_CASES = [
    (1, 2, 2, 1, 1, 16, True, None, None, None),
    (2, 2, 2, 37, 37, 16, True, None, 16, 16),
    (1, 5, 1, 19, 19, 64, True, None, 16, 16),
    (1, 7, 1, 1, 45, 64, True, None, None, None),
    (2, 4, 2, 13, 50, 8, True, None, 16, 16),
    (1, 4, 2, 20, 33, 128, False, None, 16, 32),
    (3, 2, 1, 9, 40, 16, True, [40, 9, 25], 16, 16),
    (2, 2, 1, 9, 40, 16, True, [5, 0], 16, 16),
]


def attn_id(case):
    B, Hq, Hkv, Tq, Tk, D, causal, lens, *_ = case
    return f"B{B}-G{Hq // Hkv}-Tq{Tq}-Tk{Tk}-D{D}" + ("" if causal else "-full") + ("" if lens is None else "-lens")


def check_attention(q, k, v, atol, block_m=None, block_n=None, **kw):
    out = K.attention(q, k, v, block_m=block_m, block_n=block_n, **kw)
    ref = K.attention_ref(q.double(), k.double(), v.double(), **kw)
    assert_within_2x_torch(out, K.attention_ref(q, k, v, **kw), ref, atol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ATTN_CASES, ids=attn_id)
def test_attention(case, dtype):
    B, Hq, Hkv, Tq, Tk, D, causal, lens, bm, bn = case
    q, k, v = randn(B, Hq, Tq, D, dtype=dtype), randn(B, Hkv, Tk, D, dtype=dtype), randn(B, Hkv, Tk, D, dtype=dtype)
    kv_lens = None if lens is None else torch.tensor(lens, device=DEVICE)
    check_attention(q, k, v, ATOL[dtype], bm, bn, causal=causal, kv_lens=kv_lens)


def test_attention_model_layout():
    # the model's q/k/v are [B, T, H, D] projections viewed as [B, H, T, D]; the output transposes back for free
    B, T, Hq, Hkv, D = 2, 11, 6, 2, 16
    q = randn(B, T, Hq, D).transpose(1, 2)
    k, v = randn(B, T, Hkv, D).transpose(1, 2), randn(B, T, Hkv, D).transpose(1, 2)
    out = K.attention(q, k, v, block_m=16, block_n=16)
    assert out.transpose(1, 2).is_contiguous()
    assert_within_2x_torch(out, K.attention_ref(q, k, v), K.attention_ref(q.double(), k.double(), v.double()), 1e-6)


def test_attention_equals_decode_for_one_query():
    q, k, v = randn(2, 6, 1, 16), randn(2, 3, 40, 16), randn(2, 3, 40, 16)
    lens = torch.tensor([40, 7], device=DEVICE)
    a = K.attention(q, k, v, kv_lens=lens, block_m=16, block_n=16)
    d = K.decode_attention(q, k, v, lens, num_splits=3, block_n=16)
    torch.testing.assert_close(a, d, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------ decode

# (B, Hq, Hkv, S, D, seq_lens, num_splits, block_n): GQA ratios 1, 5, 7; rows of different lengths, an empty
# row, a row of length 1; splits past a row's end; lengths not multiples of the block.
DECODE_CASES = [
    (3, 7, 1, 70, 64, [70, 1, 33], None, None),
    (2, 5, 1, 50, 16, [0, 49], 3, 16),
    (2, 4, 4, 40, 8, [17, 40], 5, 16),
    (1, 2, 2, 100, 128, [100], 1, None),
    (2, 14, 2, 64, 64, [64, 23], 2, None),
]


def decode_id(case):
    B, Hq, Hkv, S, D, lens, splits, _ = case
    return f"B{B}-G{Hq // Hkv}-S{S}-D{D}-lens{'_'.join(map(str, lens))}-splits{splits}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", DECODE_CASES, ids=decode_id)
def test_decode_attention(case, dtype):
    B, Hq, Hkv, S, D, lens, splits, bn = case
    q, k, v = randn(B, Hq, 1, D, dtype=dtype), randn(B, Hkv, S, D, dtype=dtype), randn(B, Hkv, S, D, dtype=dtype)
    seq_lens = torch.tensor(lens, device=DEVICE, dtype=torch.int32)
    out = K.decode_attention(q, k, v, seq_lens, num_splits=splits, block_n=bn)
    ref = K.decode_attention_ref(q.double(), k.double(), v.double(), seq_lens)
    assert_within_2x_torch(out, K.decode_attention_ref(q, k, v, seq_lens), ref, ATOL[dtype])


def test_decode_attention_reads_only_the_live_prefix():
    q, k, v = randn(2, 4, 1, 16), randn(2, 2, 48, 16), randn(2, 2, 48, 16)
    lens = torch.tensor([20, 48], device=DEVICE)
    before = K.decode_attention(q, k, v, lens, num_splits=2, block_n=16)
    k[0, :, 20:], v[0, :, 20:] = float("nan"), float("nan")  # stale cache slots past row 0's length
    assert torch.equal(K.decode_attention(q, k, v, lens, num_splits=2, block_n=16), before)


# ------------------------------------------------------------------------------------------------- bad inputs

f16 = torch.float16


def ones(*shape, dtype=torch.float32):
    return torch.ones(*shape, dtype=dtype, device=DEVICE)


BAD_INPUTS = [
    ("rms_norm fp64", lambda: K.rms_norm(randn(2, 8).double(), ones(8), 1e-6), TypeError, "float64"),
    ("rms_norm int", lambda: K.rms_norm(ones(2, 8, dtype=torch.int32), ones(8), 1e-6), TypeError, "int32"),
    ("rms_norm list", lambda: K.rms_norm([1.0], ones(1), 1e-6), TypeError, "list"),
    ("rms_norm weight", lambda: K.rms_norm(randn(2, 8), ones(9), 1e-6), ValueError, "(9,)"),
    ("rms_norm eps", lambda: K.rms_norm(randn(2, 8), ones(8), -1.0), ValueError, "-1.0"),
    ("rms_norm eps nan", lambda: K.rms_norm(randn(2, 8), ones(8), float("nan")), ValueError, "nan"),
    ("rms_norm residual shape", lambda: K.rms_norm(randn(2, 8), ones(8), 1e-6, randn(3, 8)), ValueError,
     "(3, 8)"),
    ("rms_norm residual dtype", lambda: K.rms_norm(randn(2, 8), ones(8), 1e-6, randn(2, 8, dtype=f16)),
     TypeError, "float16"),
    ("rms_norm strides", lambda: K.rms_norm(randn(8, 4).t(), ones(8), 1e-6), ValueError, "(1, 4)"),
    ("rms_norm rows", lambda: K.rms_norm(randn(4, 3, 8).transpose(0, 1), ones(8), 1e-6), ValueError,
     "(8, 24, 1)"),
    ("rms_norm huge", lambda: K.rms_norm(randn(1, 70000), ones(70000), 1e-6), ValueError, "70000"),
    ("attention 3-D", lambda: K.attention(randn(2, 4, 16), randn(2, 4, 16), randn(2, 4, 16)), ValueError, "4-D"),
    ("attention heads", lambda: K.attention(randn(1, 5, 4, 16), randn(1, 2, 4, 16), randn(1, 2, 4, 16)), ValueError,
     "multiple of KV heads 2"),
    ("attention dtypes", lambda: K.attention(randn(1, 2, 4, 16), randn(1, 2, 4, 16, dtype=f16), randn(1, 2, 4, 16)),
     TypeError, "float16"),
    ("attention v shape", lambda: K.attention(randn(1, 2, 4, 16), randn(1, 2, 4, 16), randn(1, 2, 5, 16)), ValueError,
     "(1, 2, 5, 16)"),
    ("attention Tq > Tk", lambda: K.attention(randn(1, 2, 6, 16), randn(1, 2, 4, 16), randn(1, 2, 4, 16)), ValueError,
     "6 > 4"),
    ("attention head dim", lambda: K.attention(randn(1, 1, 2, 300), randn(1, 1, 2, 300), randn(1, 1, 2, 300)),
     ValueError, "300"),
    ("attention last dim", lambda: K.attention(randn(1, 2, 16, 4).transpose(2, 3), randn(1, 2, 4, 16),
                                               randn(1, 2, 4, 16)), ValueError, "contiguous last dim"),
    ("attention kv_lens dtype", lambda: K.attention(randn(1, 2, 4, 16), randn(1, 2, 4, 16), randn(1, 2, 4, 16),
                                                    kv_lens=ones(1)), TypeError, "float32"),
    ("attention kv_lens shape", lambda: K.attention(randn(1, 2, 4, 16), randn(1, 2, 4, 16), randn(1, 2, 4, 16),
                                                    kv_lens=ones(2, dtype=torch.long)), ValueError, "(2,)"),
    ("attention block", lambda: K.attention(randn(1, 2, 4, 16), randn(1, 2, 4, 16), randn(1, 2, 4, 16), block_m=24),
     ValueError, "got 24"),
    ("attention scale", lambda: K.attention(randn(1, 2, 4, 16), randn(1, 2, 4, 16), randn(1, 2, 4, 16),
                                            scale=float("inf")), ValueError, "inf"),
    ("decode Tq", lambda: K.decode_attention(randn(1, 2, 2, 16), randn(1, 2, 4, 16), randn(1, 2, 4, 16),
                                             ones(1, dtype=torch.long)), ValueError, "(1, 2, 2, 16)"),
    ("decode seq_lens dtype", lambda: K.decode_attention(randn(1, 2, 1, 16), randn(1, 2, 4, 16), randn(1, 2, 4, 16),
                                                         ones(1)), TypeError, "float32"),
    ("decode seq_lens shape", lambda: K.decode_attention(randn(1, 2, 1, 16), randn(1, 2, 4, 16), randn(1, 2, 4, 16),
                                                         ones(1, 1, dtype=torch.long)), ValueError, "(1, 1)"),
    ("decode splits", lambda: K.decode_attention(randn(1, 2, 1, 16), randn(1, 2, 4, 16), randn(1, 2, 4, 16),
                                                 ones(1, dtype=torch.long), num_splits=0), ValueError, "got 0"),
    ("decode heads", lambda: K.decode_attention(randn(1, 3, 1, 16), randn(1, 2, 4, 16), randn(1, 2, 4, 16),
                                                ones(1, dtype=torch.long)), ValueError, "query heads 3"),
]  # fmt: skip


@pytest.mark.parametrize("call, exc, match", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_with_the_offending_values(call, exc, match):
    with pytest.raises(exc) as info:
        call()
    assert match in str(info.value)


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    # cwd = the repo root with "" first on sys.path, as under `python -m pytest`
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CUDA, reason="checks the CPU error path")
def test_cpu_tensors_without_the_interpreter_get_a_clear_error():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import torch, qwen_ref_kernels as K\n"
        "try:\n    K.rms_norm(torch.ones(2, 8), torch.ones(8), 1e-6)\n"
        "except ValueError as e:\n    print('ERR', e)\n"
    )
    proc = run_python(code, env)
    assert proc.returncode == 0, proc.stderr
    assert "ERR" in proc.stdout and "TRITON_INTERPRET=1" in proc.stdout


# -------------------------------------------------------------------------------------------------- transformers


def test_transformers_rmsnorm_and_our_kernel_in_one_process():
    pytest.importorskip("transformers")
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    for dtype in DTYPES:
        norm = Qwen2RMSNorm(896, eps=1e-6).to(device=DEVICE, dtype=dtype)
        with torch.no_grad():
            norm.weight.copy_(1 + 0.5 * torch.randn(896))
            x = randn(2, 5, 896, dtype=dtype)
            hf = norm(x)
        ours = K.rms_norm(x, norm.weight.detach(), 1e-6)
        ref = K.rms_norm_ref(x.double(), norm.weight.detach().double(), 1e-6)
        assert_within_2x_torch(ours, hf, ref, ATOL[dtype])


def test_the_repo_has_no_kernels_package_for_transformers_to_find():
    # transformers probes `import kernels` (HF's hub-kernel loader); with the repo root on sys.path, as under
    # `python -m pytest`, a folder of that name would be found instead and break `import transformers` models
    code = (
        "import importlib.util, transformers.utils.import_utils as iu\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(spec is None or 'site-packages' in spec.origin, iu.is_kernels_available() in (True, False))\n"
    )
    pytest.importorskip("transformers")
    proc = run_python(code, dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True"], proc.stdout


# ------------------------------------------------------------------------------------------------ GPU, real sizes


@pytest.mark.slow
@pytest.mark.skipif(CUDA, reason="with a GPU the cuda tests below compile for real")
def test_gpu_code_path_compiles_for_sm90_without_a_gpu():
    # the interpreter never runs the GPU branches (native bf16 dots and casts, pipelining): compile them for H100
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "qwen_ref_kernels.compile_check", "--quick", "--arch", "90"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(4, 2048, 896), (2, 1024, 3584), (8192, 8192), (3, 333, 5120)], ids=str)
def test_rms_norm_gpu(shape, dtype):
    check_rms_norm(randn(*shape, dtype=dtype), (1 + randn(shape[-1])).to(dtype), 1e-6)
    check_rms_norm(randn(*shape, dtype=dtype), (1 + randn(shape[-1])).to(dtype), 1e-6, randn(*shape, dtype=dtype))


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "B, Hq, Hkv, Tq, Tk, D",
    [(1, 14, 2, 2048, 2048, 64), (2, 28, 4, 1031, 1031, 128), (1, 40, 8, 512, 4096, 128), (4, 16, 16, 1, 777, 64)],
    ids=str,
)
def test_attention_gpu(B, Hq, Hkv, Tq, Tk, D, dtype):
    q, k, v = randn(B, Hq, Tq, D, dtype=dtype), randn(B, Hkv, Tk, D, dtype=dtype), randn(B, Hkv, Tk, D, dtype=dtype)
    check_attention(q, k, v, ATOL[dtype])
    lens = torch.randint(Tq, Tk + 1, (B,), device=DEVICE)
    check_attention(q, k, v, ATOL[dtype], kv_lens=lens)


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B, Hq, Hkv, S, D", [(16, 28, 4, 8192, 128), (1, 14, 2, 32768, 64), (7, 40, 8, 3000, 128)])
def test_decode_attention_gpu(B, Hq, Hkv, S, D, dtype):
    q, k, v = randn(B, Hq, 1, D, dtype=dtype), randn(B, Hkv, S, D, dtype=dtype), randn(B, Hkv, S, D, dtype=dtype)
    seq_lens = torch.randint(1, S + 1, (B,), device=DEVICE)
    out = K.decode_attention(q, k, v, seq_lens)
    ref = K.decode_attention_ref(q.double(), k.double(), v.double(), seq_lens)
    assert_within_2x_torch(out, K.decode_attention_ref(q, k, v, seq_lens), ref, ATOL[dtype])
