"""Tensor parallelism at 1, 2 and 4 ranks: forward tokens/s, peak RSS per rank, and the logits' difference from
one rank, in the same run.

    python benchmarks/bench_tp.py                         # Qwen1.5-0.5B shapes (16/16 heads), float32, 256 tokens
    python benchmarks/bench_tp.py --preset qwen2.5-0.5b-shape --worlds 1,2 --tokens 512

Each world size starts its ranks with qwen_ref.parallel.launch.spawn (gloo on the CPU, one torch thread per rank,
so on a 2-core machine 4 ranks share 2 cores). Each rank loads its slices, runs one warm-up forward and then
--reps timed forwards over the same --tokens tokens; rank 0 prints one JSON line. The world-1 logits are the
reference for the difference.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from qwen_ref.checkpoint.tiny import cached_tiny_checkpoint, make_tiny_checkpoint
from qwen_ref.config import QwenConfig
from qwen_ref.parallel.launch import spawn
from qwen_ref.parallel.tp import load_tensor_parallel


@torch.inference_mode()
def rank(rank: int, world: int, directory: str, tokens: int, reps: int, out: str) -> None:
    config = QwenConfig.from_file(Path(directory) / "config.json")
    model = load_tensor_parallel(Path(directory), config, dtype=torch.float32, rank=rank, world=world)
    ids = torch.tensor([[(i * 7919) % 150000 for i in range(tokens)]])
    logits = model(ids)
    times = []
    for _ in range(reps):
        dist.barrier()
        started = time.perf_counter()
        model(ids)
        times.append(time.perf_counter() - started)
    rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20])
    all_rss = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(all_rss, rss)
    if rank == 0:
        reference = Path(out) / "world1.pt"
        if world == 1:
            torch.save(logits, reference)
        diff = (logits - torch.load(reference)).abs().max().item()
        best = min(times)
        print(json.dumps({"bench": "tp", "world": world, "tokens": tokens, "forward_s": round(best, 4),
                          "tokens_per_s": round(tokens / best, 1), "peak_rss_gb_per_rank": [round(r.item(), 3)
                                                                                          for r in all_rss],
                          "max_abs_logit_diff_vs_1": diff,
                          "max_abs_logit": round(logits.abs().max().item(), 3)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="qwen1.5-0.5b-shape")
    parser.add_argument("--worlds", default="1,2,4")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        directory = (cached_tiny_checkpoint(args.preset) if args.preset in ("qwen2.5", "qwen1.5")
                     else make_tiny_checkpoint(args.preset, Path(scratch) / "ckpt", dtype="float32"))
        for world in (int(w) for w in args.worlds.split(",")):
            spawn(rank, world, str(directory), args.tokens, args.reps, scratch, timeout_s=600)


if __name__ == "__main__":
    main()
