"""Compile every kernel for an NVIDIA GPU on a machine without one (Triton's compiler and its bundled ptxas).

The interpreter runs the kernels with DOT_F32 and INTERPRET set; this compiles the GPU path (native 16-bit dots,
native casts, pipelined loads) in the configurations the launchers pick, and checks each fits the target's
shared memory. One JSON line per compile; exit status 1 if any fails.

    python -m qwen_ref_kernels.compile_check               # sm_90 (H100/H200), every dtype and head dim
    python -m qwen_ref_kernels.compile_check --arch 80 --quick
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ._common import INTERPRET
from .attention import _TUNED, _attn_fwd_kernel, fixed_config
from .decode_attention import _decode_reduce_kernel, _decode_split_kernel
from .rms_norm import _launch_config, _rms_norm_kernel

SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # bytes of shared memory per block (opt-in max)
TL = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def _signature(kernel, pointers: dict[str, str], floats: tuple[str, ...], constexprs: dict) -> dict[str, str]:
    kinds = {}
    for name in kernel.arg_names:
        if name in constexprs:
            kinds[name] = "constexpr"
        else:
            kinds[name] = pointers.get(name) or ("fp32" if name in floats else "i32")
    return kinds


def _cases(quick: bool):
    """(kernel, pointer types, float args, constexprs, options, fixed): fixed configs must fit; tuned ones may not."""
    # quick: the 16-bit GPU path (native bf16 dots and casts) and the fp32 one (exact "ieee" dots)
    plan = [("bfloat16", [128]), ("float32", [64])] if quick else [(d, [64, 128, 80, 256]) for d in TL]
    for dtype, head_dims in plan:
        t = TL[dtype]
        for n, fused in [(896, True)] if quick else [(896, False), (3000, True), (8192, True)]:
            block_n, rows, warps = _launch_config(n)
            yield (_rms_norm_kernel, {p: f"*{t}" for p in ("x_ptr", "res_ptr", "w_ptr", "out_ptr", "res_out_ptr")},
                   ("eps",), dict(HAS_RESIDUAL=fused, ROWS=rows, BLOCK_N=block_n, INTERPRET=False),
                   dict(num_warps=warps), True)  # fmt: skip
        fp32 = dtype == "float32"
        precision = "ieee" if fp32 else "tf32"
        for D in head_dims:
            block_d = max(16, triton.next_power_of_2(D))
            attn_ptrs = {"q_ptr": f"*{t}", "k_ptr": f"*{t}", "v_ptr": f"*{t}", "o_ptr": f"*{t}", "kv_lens_ptr": "*i64"}
            configs = [fixed_config(True, False, block_d)] if fp32 else _TUNED[:1] if quick else _TUNED
            # (CAUSAL, HAS_KV_LENS): the model's plain prefill on every config, the other variants on the first
            if quick:
                variants = [(True, True)] if fp32 else [(True, False)]
            else:
                variants = [(True, False), (True, True), (False, False)]
            for i, (bm, bn, warps, stages) in enumerate(configs):
                for causal, has_lens in variants if i == 0 else variants[:1]:
                    meta = dict(CAUSAL=causal, HAS_KV_LENS=has_lens, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d,
                                EVEN_D=block_d == D, DOT_F32=False, PRECISION=precision, INTERPRET=False)  # fmt: skip
                    options = dict(num_warps=warps, num_stages=stages)
                    yield _attn_fwd_kernel, attn_ptrs, ("qk_scale",), meta, options, fp32
            split_ptrs = {"q_ptr": f"*{t}", "k_ptr": f"*{t}", "v_ptr": f"*{t}", "lens_ptr": "*i32",
                          "o_part_ptr": "*fp32", "lse_ptr": "*fp32"}  # fmt: skip
            meta = dict(BLOCK_G=16, BLOCK_N=32 if fp32 else 64, BLOCK_D=block_d, DOT_F32=False, PRECISION=precision,
                        INTERPRET=False)  # fmt: skip
            options = dict(num_warps=4, num_stages=2 if fp32 else 3)
            yield _decode_split_kernel, split_ptrs, ("qk_scale",), meta, options, True
            reduce_ptrs = {"o_part_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": f"*{t}"}
            meta = dict(BLOCK_S=64, BLOCK_D=block_d, INTERPRET=False)
            yield _decode_reduce_kernel, reduce_ptrs, (), meta, dict(num_warps=4), True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 89, 90")
    parser.add_argument("--quick", action="store_true", help="bf16 at head dim 128 and fp32 at 64, one config each")
    args = parser.parse_args(argv)
    if INTERPRET:
        print("compile_check: unset TRITON_INTERPRET; interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    target = GPUTarget("cuda", args.arch, 32)
    limit = SHARED_LIMIT.get(args.arch)
    failed = 0
    for kernel, pointers, floats, constexprs, options, fixed in _cases(args.quick):
        start = time.perf_counter()
        record = {"kernel": kernel.__name__, "arch": args.arch, **options,
                  **{k: v for k, v in constexprs.items() if k != "INTERPRET"}}  # fmt: skip
        try:
            src = ASTSource(kernel, _signature(kernel, pointers, floats, constexprs), constexprs)
            shared = triton.compile(src, target=target, options=options).metadata.shared
            fits = limit is None or shared <= limit
            record.update(ok=fits or not fixed, shared_bytes=shared, fits_shared_memory=fits)
        except Exception as e:  # report every failing configuration, not only the first
            record.update(ok=False, error=f"{type(e).__name__}: {e}"[:500])
        record["seconds"] = round(time.perf_counter() - start, 1)
        failed += not record["ok"]
        print(json.dumps(record), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
