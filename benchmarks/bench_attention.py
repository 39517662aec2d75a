"""Prefill and decode attention kernels against the PyTorch reference and torch's scaled_dot_product_attention.

    python benchmarks/bench_attention.py                      # Qwen2.5-0.5B and -7B head layouts, bf16
    python benchmarks/bench_attention.py --mode decode --context 8192 32768

One JSON line per (case, provider): median and 20/80% quantiles (ms, triton.testing.do_bench). Prefill reports
TFLOP/s (4 * D flops per visible query-key pair, causal pairs counted exactly) and the fraction of the GPU's dense
16-bit tensor peak; decode reports GB/s (the live K/V bytes, read once) and the fraction of peak bandwidth.
SDPA runs on K/V expanded to all query heads (expanded outside the timing) with the flash backend when it takes
the inputs; prefill uses Tq = Tk, where SDPA's top-left causal mask equals our bottom-right one.
Without CUDA it says so, runs a correctness pass under the Triton interpreter on small shapes and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated, i.e. at import

import triton.testing  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from qwen_ref_kernels import attention, attention_ref, decode_attention, decode_attention_ref  # noqa: E402

# (peak HBM bytes/s, peak dense fp16/bf16 tensor FLOP/s) by device-name substring, most specific first
PEAKS = [("H100 PCIe", 2.0e12, 756e12), ("H100 NVL", 3.9e12, 835e12), ("H200", 4.8e12, 989e12),
         ("H100", 3.35e12, 989e12), ("A100", 2.04e12, 312e12)]  # fmt: skip
LAYOUTS = {  # (Hq, Hkv, D)
    "qwen2.5-0.5b": (14, 2, 64), "qwen2.5-7b": (28, 4, 128), "qwen2.5-coder-32b": (40, 8, 128),
}
QUANTILES = [0.5, 0.2, 0.8]


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def peaks(name: str) -> tuple[float | None, float | None]:
    return next(((bw, fl) for key, bw, fl in PEAKS if key in name), (None, None))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def sdpa(q, k, v, causal):
    """SDPA with the flash backend (the target to beat), or whatever SDPA picks if flash rejects the inputs."""

    def flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    try:
        flash()
        return flash, "flash"
    except RuntimeError:
        return (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)), "default"


def time_providers(providers: dict, record: dict, work: float, unit: str, peak: float | None) -> None:
    times = {}
    for provider, fn in providers.items():
        ms, lo, hi = triton.testing.do_bench(fn, quantiles=QUANTILES)
        times[provider] = ms
        rate = work / (ms * 1e-3)
        emit({
            **record, "provider": provider, "ms_median": ms, "ms_p20": lo, "ms_p80": hi,
            unit: rate / 1e12 if unit == "tflop_per_s" else rate / 1e9,
            "frac_peak": rate / peak if peak and not (unit == "tflop_per_s" and record["dtype"] == "float32") else None,
            "speed_vs_sdpa": times["sdpa"] / ms if "sdpa" in times else None,
        })  # fmt: skip


def bench_prefill(layout: str, batch: int, tokens: int, dtype: torch.dtype, device_name: str) -> None:
    Hq, Hkv, D = LAYOUTS[layout]
    q = torch.randn(batch, Hq, tokens, D, device="cuda", dtype=dtype)
    k, v = (torch.randn(batch, Hkv, tokens, D, device="cuda", dtype=dtype) for _ in range(2))
    k_rep, v_rep = (t.repeat_interleave(Hq // Hkv, dim=1) for t in (k, v))  # [B, Hq, T, D] for SDPA
    sdpa_fn, backend = sdpa(q, k_rep, v_rep, True)
    providers = {"sdpa": sdpa_fn, "triton": lambda: attention(q, k, v, causal=True)}
    if tokens <= 4096:  # the reference materialises [B, Hq, T, T] scores
        providers["torch_ref"] = lambda: attention_ref(q, k, v, causal=True)
    visible_pairs = tokens * (tokens + 1) // 2  # causal, Tq = Tk
    flops = 4 * D * batch * Hq * visible_pairs
    record = {"bench": "attention_prefill", "layout": layout, "batch": batch, "tokens": tokens,
              "dtype": str(dtype).removeprefix("torch."), "device": device_name, "sdpa_backend": backend,
              "max_abs_diff_triton_vs_sdpa": max_diff(providers["triton"](), sdpa_fn())}  # fmt: skip
    time_providers(providers, record, flops, "tflop_per_s", peaks(device_name)[1])


def bench_decode(layout: str, batch: int, context: int, dtype: torch.dtype, device_name: str) -> None:
    Hq, Hkv, D = LAYOUTS[layout]
    q = torch.randn(batch, Hq, 1, D, device="cuda", dtype=dtype)
    k, v = (torch.randn(batch, Hkv, context, D, device="cuda", dtype=dtype) for _ in range(2))
    seq_lens = torch.full((batch,), context, device="cuda", dtype=torch.int32)  # full rows: SDPA has no lengths
    k_rep, v_rep = (t.repeat_interleave(Hq // Hkv, dim=1) for t in (k, v))
    sdpa_fn, backend = sdpa(q, k_rep, v_rep, False)
    providers = {
        "sdpa": sdpa_fn,
        "triton": lambda: decode_attention(q, k, v, seq_lens),
        "torch_ref": lambda: decode_attention_ref(q, k, v, seq_lens),
    }
    nbytes = 2 * k.numel() * k.element_size() + 2 * q.numel() * q.element_size()  # K and V read once; q in, out
    record = {"bench": "attention_decode", "layout": layout, "batch": batch, "context": context,
              "dtype": str(dtype).removeprefix("torch."), "device": device_name, "sdpa_backend": backend,
              "max_abs_diff_triton_vs_sdpa": max_diff(providers["triton"](), sdpa_fn()),
              "note": "sdpa reads K/V expanded to all query heads: G times the bytes counted here"}  # fmt: skip
    time_providers(providers, record, nbytes, "gb_per_s", peaks(device_name)[0])


# (kind, (B, Hq, Hkv, Tq, Tk, D)): GQA 7 and 2, Tq < Tk, decode rows of lengths 45, 1 and 22
CHECK_CASES = [("prefill", (1, 7, 1, 19, 19, 64)), ("prefill", (2, 4, 2, 5, 37, 16)), ("decode", (3, 5, 1, 1, 45, 64))]


def correctness_pass() -> bool:
    """Small odd shapes under the interpreter: kernel error <= 2 x the same-dtype torch error + atol (fp64 ref)."""
    ok = True
    atol = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}
    for dtype in atol:
        for kind, (B, Hq, Hkv, Tq, Tk, D) in CHECK_CASES:
            q = torch.randn(B, Hq, Tq, D).to(dtype)
            k, v = (torch.randn(B, Hkv, Tk, D).to(dtype) for _ in range(2))
            if kind == "prefill":
                out, pt = attention(q, k, v, block_m=16, block_n=16), attention_ref(q, k, v)
                ref = attention_ref(q.double(), k.double(), v.double())
            else:
                lens = torch.tensor([Tk, 1, Tk // 2][:B])
                out, pt = decode_attention(q, k, v, lens), decode_attention_ref(q, k, v, lens)
                ref = decode_attention_ref(q.double(), k.double(), v.double(), lens)
            err = (out.double() - ref).abs().max().item()
            err_pt = (pt.double() - ref).abs().max().item()
            passed = err <= 2 * err_pt + atol[dtype]
            ok &= passed
            emit({
                "bench": f"attention_{kind}", "mode": "interpreter_correctness", "shape": [B, Hq, Hkv, Tq, Tk, D],
                "dtype": str(dtype).removeprefix("torch."), "max_err": err, "max_err_torch_same_dtype": err_pt,
                "passed": passed,
            })  # fmt: skip
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=["prefill", "decode", "both"], default="both")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--layout", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 8192], help="prefill lengths")
    parser.add_argument("--context", type=int, nargs="+", default=[8192], help="decode cache lengths")
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="default: 1 (prefill), 1 and 16 (decode)")
    args = parser.parse_args()
    if not CUDA:
        emit({"bench": "attention", "cuda": False,
              "note": "no CUDA device: no timings; correctness pass under TRITON_INTERPRET=1 on small shapes"})
        return 0 if correctness_pass() else 1
    device_name = torch.cuda.get_device_name()
    dtype = getattr(torch, args.dtype)
    for layout in args.layout:
        if args.mode in ("prefill", "both"):
            for batch in args.batch or [1]:
                for tokens in args.tokens:
                    bench_prefill(layout, batch, tokens, dtype, device_name)
        if args.mode in ("decode", "both"):
            for batch in args.batch or [1, 16]:
                for context in args.context:
                    bench_decode(layout, batch, context, dtype, device_name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
