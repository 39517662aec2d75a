"""n seeded samples of one prompt: one batched generation against single runs, in one process.

The batched run is exact (the engine's exact mode on a model loaded with load()'s default options, whose decode
linears on the CPU are the batch-invariant kernel: decode_linear="auto" resolves to "invariant"): the prompt
is prefilled once and the n samples decode as one batch, and sample i must equal the single run with seed + i. The
script checks that for the first --check samples and reports it. A single run and each of n sequential single runs
do the same work, so the tokens/s of n sequential runs is the tokens/s of one run, which is what is timed
(median of --repeats). No stop ids: every sample produces exactly --new-tokens tokens.

    python benchmarks/bench_samples.py [--preset qwen2.5-0.5b-shape] [--dtype float32 bfloat16] [--samples 32]
                                       [--new-tokens 128] [--prompt-len 128] [--inexact]

--inexact also times the BLAS batched path (decode_linear="torch", exact=False), which is not bit-equal to
single runs, for comparison.
"""

from __future__ import annotations

import argparse
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

from qwen_ref.engine import generate_ids
from qwen_ref.qwen import load

PARAMS = {"temperature": 0.8, "top_p": 0.95, "top_k": 50, "repetition_penalty": 1.1}


def run(model, prompt, seeds, new_tokens, exact: bool) -> tuple[float, list[list[int]]]:
    params = [{**PARAMS, "seed": s} for s in seeds]
    t = time.perf_counter()
    out = generate_ids(model, [prompt] * len(seeds), new_tokens, params=params, exact=exact,
                       max_running=len(seeds))
    return time.perf_counter() - t, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=PRESETS[0], choices=PRESETS)
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2, help="single runs timed (median)")
    ap.add_argument("--check", type=int, default=2, help="samples compared with their single run")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--inexact", action="store_true", help="also time the BLAS batched path (not bit-equal)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print_machine(args.threads)
    prompt = torch.randint(0, 151643, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    seeds = [args.seed + i for i in range(args.samples)]
    path = checkpoint(args.preset)
    for dtype in args.dtype:
        qwen = load(path, dtype=dtype)  # the default options
        if not qwen.model.backends.batch_invariant:
            sys.exit(f"bench_samples: load()'s default decode linear here is {qwen.model.backends.name!r}, not the "
                     "batch-invariant kernel (no C++ compiler?): the samples would not share a forward")
        run(qwen.model, prompt, seeds[:1], 4, exact=True)  # warm-up
        singles = [run(qwen.model, prompt, [seeds[i % args.samples]], args.new_tokens, exact=True)
                   for i in range(max(args.repeats, args.check))]
        single_s = statistics.median(t for t, _ in singles[: max(args.repeats, 1)])
        batch_s, batch_out = run(qwen.model, prompt, seeds, args.new_tokens, exact=True)
        identical = all(batch_out[i] == singles[i][1][0] for i in range(min(args.check, args.samples)))
        single_tok_s = args.new_tokens / single_s
        batch_tok_s = args.samples * args.new_tokens / batch_s
        row = {"bench": "samples", "preset": args.preset, "dtype": dtype, "samples": args.samples,
               "new_tokens": args.new_tokens, "prompt_len": args.prompt_len, "threads": args.threads,
               "backends": qwen.model.backends.name, "single_run_s": round(single_s, 2),
               "sequential_tok_s": round(single_tok_s, 2), "batched_s": round(batch_s, 2),
               "batched_tok_s": round(batch_tok_s, 2), "speedup_vs_sequential": round(batch_tok_s / single_tok_s, 2),
               "checked_identical_to_single": identical, "checked": min(args.check, args.samples)}
        print(json.dumps(row), flush=True)
        del qwen
        if args.inexact:
            qwen = load(path, dtype=dtype, decode_linear="torch")
            t, _ = run(qwen.model, prompt, seeds, args.new_tokens, exact=False)
            print(json.dumps({"bench": "samples", "preset": args.preset, "dtype": dtype, "samples": args.samples,
                              "decode_linear": "torch", "exact": False, "batched_s": round(t, 2),
                              "batched_tok_s": round(args.samples * args.new_tokens / t, 2),
                              "speedup_vs_sequential": round(args.samples * args.new_tokens / t / single_tok_s, 2)}),
                  flush=True)
            del qwen
    return 0


if __name__ == "__main__":
    sys.exit(main())
