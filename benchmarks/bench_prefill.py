"""Prefill speed against torch.mm on the same shapes, in one run.

A prompt of T tokens is one forward through the engine's model call (a KV cache, logits of the last token only,
as the engine's last prefill chunk). Its floor is the matrix products: every linear of every layer over T rows,
and the lm_head over one row. This script times both, alternating in each round, and reports how close the
forward comes to the products alone (--rounds rounds, medians):

    mm_fraction = time(torch.mm over the forward's linear shapes) / time(forward)

The rest of the forward is attention (T^2 work, growing with T), RMSNorm, rope and the residual adds.
--chunk N (0: one forward, the default) prefills as the engine does instead: forwards of N tokens at offsets
0, N, 2N, ... of the prompt, the last one with logits; the torch.mm reference stays the one-shot shapes, so the
fraction also shows what chunking costs (the engine's default chunk is 32 tokens).
--bf16-route picks how a bfloat16 prompt runs in the default backend: "auto" as load() decides (torch's products
and flash attention on CPUs with AMX, backends.torch_bf16_prefill), "torch" or "kernels" forced, to compare the
two on one machine.

    python benchmarks/bench_prefill.py [--preset qwen2.5-0.5b-shape ...] [--dtype float32 bfloat16]
                                       [--tokens 512 4096] [--chunk 0] [--rounds 3] [--decode-linear auto]
                                       [--bf16-route auto]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import PRESETS, checkpoint
from limits import print_machine

from qwen_ref.models import backends
from qwen_ref.qwen import load


def forward(model, ids: torch.Tensor, chunk: int) -> float:
    T = ids.shape[1]
    step = chunk or T
    cache = model.new_cache(1, T)
    t = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, T, step):
            end = min(T, start + step)
            model(ids[:, start:end], cache=cache, last_only=True, compute_logits=end == T)
    return time.perf_counter() - t


def products(model, tokens: int) -> float:
    """torch.mm of every linear's weight over `tokens` rows (the lm_head over one), the weights as the model
    holds them; activations made once, outside the timing."""
    weight = model.lm_head.weight
    mats = [(m.weight, torch.randn(tokens, m.weight.shape[1], dtype=weight.dtype))
            for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    mats.append((weight, torch.randn(1, weight.shape[1], dtype=weight.dtype)))
    t = time.perf_counter()
    for w, x in mats:
        torch.mm(x, w.t())
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", nargs="+", default=list(PRESETS), choices=PRESETS)
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 4096])
    ap.add_argument("--chunk", type=int, default=0)
    ap.add_argument("--decode-linear", default="auto", choices=["auto", "torch", "invariant"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bf16-route", default="auto", choices=["auto", "torch", "kernels"])
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print_machine(args.threads)
    if args.bf16_route != "auto":
        backends.torch_bf16_prefill = lambda: args.bf16_route == "torch"  # the backend looks it up at each call
    for preset in args.preset:
        for dtype in args.dtype:
            model = load(checkpoint(preset), dtype=dtype, decode_linear=args.decode_linear).model
            for tokens in args.tokens:
                ids = torch.randint(0, 151643, (1, tokens), generator=torch.Generator().manual_seed(tokens))
                run_forward = functools.partial(forward, model, ids, args.chunk)
                run_mm = functools.partial(products, model, tokens)
                run_forward(), run_mm()  # warm-up
                fwd, mm = [], []
                for _ in range(args.rounds):
                    fwd.append(run_forward())
                    mm.append(run_mm())
                f, m = statistics.median(fwd), statistics.median(mm)
                print(json.dumps({"bench": "prefill", "preset": preset, "dtype": dtype, "tokens": tokens,
                                  "chunk": args.chunk, "backend": model.backends.name, "threads": args.threads,
                                  "bf16_torch_prefill": backends.torch_bf16_prefill(),
                                  "forward_s": round(f, 3), "mm_s": round(m, 3),
                                  "prefill_tok_s": round(tokens / f, 1), "mm_tok_s": round(tokens / m, 1),
                                  "mm_fraction": round(statistics.median(b / a for a, b in zip(fwd, mm)), 3)}),
                      flush=True)
            del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
