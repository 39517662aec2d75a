"""The batch-invariant CPU linear against torch's F.linear (BLAS) on Qwen2.5-0.5B's decode shapes, in one process.

For each dtype and row count M it times one decode step's worth of linears: the seven of each of --layers
layers (distinct weights, so they come from memory as in a real step, not from cache) and the lm_head. The two
sides alternate within each repeat, each after a read of the bandwidth probe (limits.py); the median of --repeats
is reported, with GB/s of weights read, the fraction of the probe's bandwidth, GFLOP/s against two float32
peaks measured in the same run (the instruction's, from independent vector multiply-adds, and a large torch.mm's;
a bfloat16 pair instruction does twice a float32 one's work, so bfloat16 rows can pass 1), and the ratio. One JSON
line per case.

    python benchmarks/bench_invariant_linear.py [--rows 1 2 8 32] [--dtype float32 bfloat16] [--layers 24]
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from limits import ReadProbe, blas_peak_flops, fma_instruction_peak_flops, interleaved, print_machine, roofline_fraction

from qwen_ref_kernels.invariant_linear import extension, invariant_linear

HIDDEN, INTERMEDIATE, KV, VOCAB = 896, 4864, 128, 151936
LAYER_SHAPES = [(HIDDEN, HIDDEN), (HIDDEN, KV), (HIDDEN, KV), (HIDDEN, HIDDEN), (HIDDEN, INTERMEDIATE),
                (HIDDEN, INTERMEDIATE), (INTERMEDIATE, HIDDEN)]  # (in K, out N): q k v o gate up down


def step(fn, weights, inputs) -> float:
    t = time.perf_counter()
    for w in weights:
        fn(inputs[w.shape[1]], w)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 8, 32])
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print_machine(args.threads)
    extension()  # build outside the timing
    probe = ReadProbe()
    peak, blas_peak = fma_instruction_peak_flops(), blas_peak_flops()
    print(json.dumps({"bench": "fma_peak", "threads": args.threads, "float32_gflop_s": round(peak / 1e9, 1),
                      "torch_mm_float32_gflop_s": round(blas_peak / 1e9, 1)}), flush=True)
    g = torch.Generator().manual_seed(0)
    for name in args.dtype:
        dtype = getattr(torch, name)
        weights = [(torch.randn(n, k, generator=g) * 0.02).to(dtype) for _ in range(args.layers)
                   for k, n in LAYER_SHAPES]
        weights.append((torch.randn(VOCAB, HIDDEN, generator=g) * 0.02).to(dtype))
        nbytes = sum(w.numel() * w.element_size() for w in weights)
        flop = 2 * sum(w.numel() for w in weights)  # per row of x
        for rows in args.rows:
            inputs = {k: torch.randn(rows, k, generator=g).to(dtype) for k in (HIDDEN, INTERMEDIATE)}
            step(invariant_linear, weights, inputs), step(F.linear, weights, inputs)  # warm-up
            r = interleaved({"ours": functools.partial(step, invariant_linear, weights, inputs),
                             "blas": functools.partial(step, F.linear, weights, inputs)}, args.repeats, probe)
            o, b = r["ours"]["s"], r["blas"]["s"]
            print(json.dumps({"bench": "invariant_linear", "dtype": name, "rows": rows, "layers": args.layers,
                              "threads": args.threads, "weight_bytes": nbytes,
                              "ours_ms": round(o * 1e3, 2), "blas_ms": round(b * 1e3, 2),
                              "ours_gb_s": round(nbytes / o / 1e9, 2), "blas_gb_s": round(nbytes / b / 1e9, 2),
                              "read_gb_s": round(r["ours"]["probe_bytes_per_s"] / 1e9, 1),
                              "ours_roofline": round(roofline_fraction(nbytes, r["ours"]["seconds"],
                                                                       r["ours"]["probes"]), 3),
                              "ours_gflop_s": round(rows * flop / o / 1e9, 1),
                              "ours_of_fma_peak": round(rows * flop / o / peak, 3),
                              "ours_of_torch_mm": round(rows * flop / o / blas_peak, 3),
                              "speedup_vs_blas": round(statistics.median(
                                  bs / os_ for bs, os_ in zip(r["blas"]["seconds"], r["ours"]["seconds"])), 3)}),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
