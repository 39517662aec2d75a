"""Tensor parallelism at 1, 2 and 4 ranks: forward tokens/s, peak RSS per rank, and the logits' difference from
one rank, in the same run, for the all-reduce (sum) and the exact-order (exact) arithmetic.

    python benchmarks/bench_tp.py                         # Qwen1.5-0.5B shapes (16/16 heads), float32, 256 tokens
    python benchmarks/bench_tp.py --preset qwen2.5-0.5b-shape --worlds 1,2 --tokens 512
    python benchmarks/bench_tp.py --coder-layers 4 --dtype bfloat16 --tokens 32 --modes sum
        # Qwen2.5-Coder-32B's real layer shapes (hidden 5120, 40/8 heads, intermediate 27648, vocab 152064) with 4
        # of its 64 layers: the memory per rank of the real model, scaled by the layer count

Each world size starts its ranks with qwen_ref.parallel.launch.spawn (gloo on the CPU, one torch thread per rank,
so on a 2-core machine 4 ranks share 2 cores). Each rank loads its slices, runs one warm-up forward and then
--reps timed forwards over the same --tokens tokens; rank 0 prints one JSON line. The world-1 logits are the
reference for the difference.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from bench_generate import memory

from qwen_ref.checkpoint.tiny import PRESETS, cached_tiny_checkpoint, make_tiny_checkpoint, write_sharded_checkpoint
from qwen_ref.config import QwenConfig
from qwen_ref.parallel.launch import spawn
from qwen_ref.parallel.tp import load_tensor_parallel


@torch.inference_mode()
def rank(rank: int, world: int, directory: str, tokens: int, reps: int, out: str, mode: str, dtype: str) -> None:
    config = QwenConfig.from_file(Path(directory) / "config.json")
    model = load_tensor_parallel(Path(directory), config, dtype=getattr(torch, dtype), rank=rank, world=world,
                                 exact=mode == "exact")
    weights = sum(p.nbytes for p in model.parameters())
    ids = torch.tensor([[(i * 7919) % 150000 for i in range(tokens)]])
    logits = model(ids)
    times = []
    for _ in range(reps):
        dist.barrier()
        started = time.perf_counter()
        model(ids)
        times.append(time.perf_counter() - started)
    # VmHWM, not ru_maxrss: ru_maxrss keeps the parent's peak across fork and exec (this script's parent built
    # the checkpoint), VmHWM is this process's own
    rss = torch.tensor([memory("VmHWM") / 2**30])
    all_rss = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(all_rss, rss)
    if rank == 0:
        reference = Path(out) / "world1.pt"
        if not reference.exists():
            torch.save(logits, reference)
        diff = (logits - torch.load(reference)).abs().max().item()
        best = min(times)
        print(json.dumps({"bench": "tp", "mode": mode, "world": world, "dtype": dtype, "layers":
                          config.num_hidden_layers, "tokens": tokens, "forward_s": round(best, 4),
                          "tokens_per_s": round(tokens / best, 1), "weights_gb_per_rank": round(weights / 1e9, 3),
                          "peak_rss_gb_per_rank": [round(r.item(), 3) for r in all_rss],
                          "max_abs_logit_diff_vs_1": diff,
                          "max_abs_logit": round(logits.abs().max().item(), 3)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="qwen1.5-0.5b-shape")
    parser.add_argument("--worlds", default="1,2,4")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--modes", default="sum,exact", help="sum: all-reduce of partial sums; exact: tp_exact")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--coder-layers", type=int, default=None,
                        help="Qwen2.5-Coder-32B's layer shapes with this many layers (instead of --preset)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        if args.coder_layers:
            directory = write_sharded_checkpoint(coder_32b(args.coder_layers), Path(scratch) / "ckpt",
                                                 dtype=args.dtype)
            size = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
            print(json.dumps({"bench": "tp-checkpoint", "layers": args.coder_layers, "dtype": args.dtype,
                              "checkpoint_gb": round(size / 1e9, 3)}), flush=True)
        elif args.preset in ("qwen2.5", "qwen1.5"):
            directory = cached_tiny_checkpoint(args.preset)
        else:
            directory = make_tiny_checkpoint(args.preset, Path(scratch) / "ckpt", dtype="float32")
        for mode in args.modes.split(","):
            for world in (int(w) for w in args.worlds.split(",")):
                spawn(rank, world, str(directory), args.tokens, args.reps, scratch, mode, args.dtype, timeout_s=600)


def coder_32b(layers: int) -> QwenConfig:
    """Qwen2.5-Coder-32B-Instruct's config.json values, with `layers` of its 64 decoder layers."""
    shape = PRESETS["qwen2.5-coder-32b-shape"].config  # its vocabulary, head_dim 128 and untied lm_head
    return replace(shape, hidden_size=5120, intermediate_size=27648, num_attention_heads=40, num_key_value_heads=8,
                   num_hidden_layers=layers, layer_types=("full_attention",) * layers)


if __name__ == "__main__":
    main()
