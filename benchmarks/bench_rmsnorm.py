"""RMSNorm kernel (plain and fused with the residual add) against its PyTorch reference and torch's F.rms_norm.

    python benchmarks/bench_rmsnorm.py                   # Qwen hidden sizes at 4096 and 16384 tokens, bf16
    python benchmarks/bench_rmsnorm.py --dtype float16 --tokens 8192

One JSON line per (shape, provider): median and 20/80% quantiles (ms, triton.testing.do_bench), achieved GB/s
(bytes that must cross HBM: inputs read once, outputs written once) and the fraction of the GPU's peak bandwidth.
Without CUDA it says so, runs a correctness pass under the Triton interpreter on small shapes and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated, i.e. at import

import triton.testing  # noqa: E402

from qwen_ref_kernels import rms_norm, rms_norm_ref  # noqa: E402

# peak HBM bandwidth (bytes/s) by device-name substring, most specific first
PEAK_BW = [("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H200", 4.8e12), ("H100", 3.35e12), ("A100", 2.04e12)]
HIDDEN = [896, 1536, 2048, 3584, 5120, 8192]  # Qwen2.5 0.5B, 1.5B, 3B, 7B, 14B/32B, 72B
QUANTILES = [0.5, 0.2, 0.8]


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def peak_bandwidth(name: str) -> float | None:
    return next((bw for key, bw in PEAK_BW if key in name), None)


def bench_case(tokens: int, hidden: int, dtype: torch.dtype, fused: bool, device_name: str) -> None:
    x = torch.randn(tokens, hidden, device="cuda", dtype=dtype)
    w = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(dtype)
    res = torch.randn_like(x) if fused else None
    eps = 1e-6
    providers = {  # the baseline first: the others report their speedup over it
        "torch_ref": lambda: rms_norm_ref(x, w, eps, res),
        "triton": lambda: rms_norm(x, w, eps, res),
    }
    if not fused:  # torch's fused op; note it multiplies the weight before the cast back (not HF's order)
        providers["torch_F.rms_norm"] = lambda: torch.nn.functional.rms_norm(x, (hidden,), w, eps)
    # bytes: read x (+ residual) and the weight, write the output (+ the new residual)
    n_tensors = 4 if fused else 2
    nbytes = n_tensors * x.numel() * x.element_size() + w.numel() * w.element_size()
    peak = peak_bandwidth(device_name)
    out, out_ref = providers["triton"](), providers["torch_ref"]()
    diff = (out[0] - out_ref[0] if fused else out - out_ref).abs().max().item()  # a sanity check, not the test
    times = {}
    for provider, fn in providers.items():
        ms, lo, hi = triton.testing.do_bench(fn, quantiles=QUANTILES)
        times[provider] = ms
        gbps = nbytes / (ms * 1e-3) / 1e9
        emit({
            "bench": "rms_norm", "provider": provider, "fused_residual": fused, "tokens": tokens, "hidden": hidden,
            "dtype": str(dtype).removeprefix("torch."), "ms_median": ms, "ms_p20": lo, "ms_p80": hi,
            "gb_per_s": gbps, "frac_peak_bw": gbps * 1e9 / peak if peak else None, "device": device_name,
            "speedup_vs_torch_ref": times["torch_ref"] / ms if "torch_ref" in times else None,
            "max_abs_diff_triton_vs_ref": diff,
        })  # fmt: skip


def correctness_pass() -> bool:
    """Small odd shapes under the interpreter: kernel error <= 2 x the same-dtype torch error + atol (fp64 ref)."""
    ok = True
    atol = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}
    for dtype in atol:
        for shape in [(5, 123), (3, 896), (1, 3000)]:
            for fused in (False, True):
                x = torch.randn(*shape).to(dtype)
                w = (1 + 0.5 * torch.randn(shape[-1])).to(dtype)
                res = torch.randn(*shape).to(dtype) if fused else None
                out, pt = rms_norm(x, w, 1e-6, res), rms_norm_ref(x, w, 1e-6, res)
                ref = rms_norm_ref(x.double(), w.double(), 1e-6, None if res is None else res.double())
                if fused:
                    out, pt, ref = out[0], pt[0], ref[0]
                err = (out.double() - ref).abs().max().item()
                err_pt = (pt.double() - ref).abs().max().item()
                passed = err <= 2 * err_pt + atol[dtype]
                ok &= passed
                emit({
                    "bench": "rms_norm", "mode": "interpreter_correctness", "shape": list(shape), "fused": fused,
                    "dtype": str(dtype).removeprefix("torch."), "max_err": err, "max_err_torch_same_dtype": err_pt,
                    "passed": passed,
                })  # fmt: skip
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--hidden", type=int, nargs="+", default=HIDDEN)
    args = parser.parse_args()
    if not CUDA:
        emit({"bench": "rms_norm", "cuda": False,
              "note": "no CUDA device: no timings; correctness pass under TRITON_INTERPRET=1 on small shapes"})
        return 0 if correctness_pass() else 1
    device_name = torch.cuda.get_device_name()
    dtype = getattr(torch, args.dtype)
    for tokens in args.tokens:
        for hidden in args.hidden:
            for fused in (False, True):
                bench_case(tokens, hidden, dtype, fused, device_name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
