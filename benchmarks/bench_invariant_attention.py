"""The invariant backend's C++ decode attention at long context: one row's attention per layer and its passes.

For each head layout and cache length it builds --layers layers of random keys and values (distinct, so that each
layer's cache comes from memory, as in a real step) and times, per layer, the whole attention (`attend_rows`) and
its three passes alone: the scores (`head_scores`), torch's float32 softmax of the scaled scores cast back, and
the values (`weighted_rows`). Each round reads the bandwidth probe first (limits.py); the fraction is the cache's
bytes (keys and values) over the attention's time over that round's probe, median over rounds. One JSON line per
case.

    python benchmarks/bench_invariant_attention.py [--context 8192] [--dtype float32 bfloat16] [--rounds 5]
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
from limits import ReadProbe, interleaved, print_machine

from qwen_ref_kernels.invariant_linear import extension

LAYOUTS = {"qwen2.5-0.5b (GQA)": (14, 2, 64), "qwen1.5-0.5b (MHA)": (16, 16, 64)}  # (query heads, KV heads, D)


def case(heads: int, kv: int, d: int, context: int, layers: int, dtype: torch.dtype) -> dict:
    ext, scale = extension(), d**-0.5
    q = torch.randn(1, kv, heads // kv, d).to(dtype)  # [1, KV, G, D]
    ks = [torch.randn(1, kv, context, d).to(dtype) for _ in range(layers)]  # [1, KV, S, D] per layer
    vs = [torch.randn(1, kv, context, d).to(dtype) for _ in range(layers)]
    scores = [ext.head_scores(q[0], k[0]) for k in ks]  # [KV, G, S]
    probs = [torch.softmax(s.mul(scale), -1, dtype=torch.float32).to(dtype) for s in scores]

    def per_layer(fn):
        def run() -> float:
            t = time.perf_counter()
            for i in range(layers):
                fn(i)
            return (time.perf_counter() - t) / layers
        return run

    return {
        "attend": per_layer(lambda i: ext.attend_rows(q, [ks[i]], [vs[i]], scale)),
        "scores": per_layer(lambda i: ext.head_scores(q[0], ks[i][0])),
        "softmax": per_layer(lambda i: torch.softmax(scores[i].mul(scale), -1, dtype=torch.float32).to(dtype)),
        "values": per_layer(lambda i: ext.weighted_rows(probs[i], vs[i][0])),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, nargs="+", default=[8192])
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print_machine(args.threads)
    probe = ReadProbe()
    for name, (heads, kv, d) in LAYOUTS.items():
        for context in args.context:
            for dtype_name in args.dtype:
                dtype = getattr(torch, dtype_name)
                timed = interleaved(case(heads, kv, d, context, args.layers, dtype), args.rounds, probe)
                cache_bytes = 2 * kv * context * d * dtype.itemsize
                att = timed["attend"]
                fraction = statistics.median(cache_bytes / s / bw for s, bw in zip(att["seconds"], att["probes"]))
                print(json.dumps({"bench": "invariant_attention", "layout": name, "context": context,
                                  "dtype": dtype_name, "threads": args.threads, "cache_bytes": cache_bytes,
                                  **{f"{k}_us": round(v["s"] * 1e6, 1) for k, v in timed.items()},
                                  "read_gb_s": round(att["probe_bytes_per_s"] / 1e9, 1),
                                  "attend_of_probe": round(fraction, 3)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
