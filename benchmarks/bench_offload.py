"""Layer streaming (offload="disk") on a checkpoint larger than what it keeps in memory: peak RSS, the read rate
against what the disk does, and scoring tokens/s against the in-memory model, in the same run.

    python benchmarks/bench_offload.py                            # ~12 GB float32 checkpoint (3B shapes), built once
    python benchmarks/bench_offload.py --dir /data/ckpt --tokens 256 --no-memory

Builds the checkpoint once (Qwen2.5-3B shapes: 36 layers, hidden 2048, 16/2 heads, intermediate 11008, tied
embeddings; one shard per layer) in --dir. Measures the disk with a direct (page-cache-bypassing) read of a shard
with dd, then scores one sequence of --tokens tokens (one forward) in a fresh process per mode: streamed, and
(unless --no-memory) in memory. Each prints one JSON line: peak RSS, load and scoring seconds, tokens/s, bytes
the streamer read and at what rate, and a digest of the scores (equal digests: equal logprobs, bit for bit).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from bench_generate import memory  # this folder is on sys.path when run as a script

CONFIG = {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
          "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 128, "max_position_embeddings": 32768,
          "tie_word_embeddings": True}


def build(directory: Path, dtype: str) -> None:
    from dataclasses import replace

    from qwen_ref.checkpoint.tiny import PRESETS, write_sharded_checkpoint

    config = replace(PRESETS["qwen2.5"].config, **CONFIG)
    if not (directory / "config.json").is_file():
        started = time.perf_counter()
        write_sharded_checkpoint(config, directory, dtype=dtype)
        print(f"built {directory} in {time.perf_counter() - started:.0f}s", file=sys.stderr)


def disk_read_gb_s(path: Path) -> float:
    """dd with O_DIRECT: the disk's own sequential read rate, not the page cache's."""
    done = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=16M", "iflag=direct"], capture_output=True,
                          text=True, check=True)
    match = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", done.stderr)
    if match is None:
        raise SystemExit(f"cannot read dd's output: {done.stderr}")
    return int(match.group(1)) / float(match.group(2)) / 1e9


def child(directory: str, offload: str, tokens: int, dtype: str) -> None:
    import torch

    import qwen_ref
    from qwen_ref.oracle.score import score

    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    started = time.perf_counter()
    qwen = qwen_ref.load(directory, offload=offload, dtype=dtype)
    loaded = time.perf_counter() - started
    ids = [(i * 7919) % 150000 for i in range(tokens)]
    started = time.perf_counter()
    records = list(score(qwen, [{"prompt_ids": ids[:1], "token_ids": ids[1:]}], top_n=0, chunk=tokens))
    scored = time.perf_counter() - started
    digest = hashlib.sha256(json.dumps([r["logprob"] for r in records]).encode()).hexdigest()[:16]
    streamer = getattr(qwen.model, "streamer", None)
    read = streamer.bytes_read if streamer is not None else 0
    print(json.dumps({"bench": "offload", "offload": offload, "dtype": dtype, "tokens": tokens,
                      "checkpoint_gb": round(sum(f.stat().st_size for f in Path(directory).glob("*.safetensors"))
                                             / 1e9, 2),
                      "peak_rss_gb": round(memory("VmHWM") / 2**30, 2),  # this process's own (not ru_maxrss)
                      "load_s": round(loaded, 2), "score_s": round(scored, 2),
                      "tokens_per_s": round(tokens / scored, 2), "streamed_gb": round(read / 1e9, 2),
                      "streamed_read_gb_s": round(read / 1e9 / scored, 2) if read else None,
                      "scores_digest": digest}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="/tmp/qwen_ref_offload_3b", help="where the checkpoint is (built once)")
    parser.add_argument("--dtype", default="float32", help="stored and compute dtype (float32: ~12 GB)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--no-memory", action="store_true", help="skip the in-memory run (not enough memory)")
    parser.add_argument("--child", nargs=2, metavar=("OFFLOAD", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[1], args.child[0], args.tokens, args.dtype)
        return
    directory = Path(args.dir)
    build(directory, args.dtype)
    shard = max(directory.glob("model-*.safetensors"), key=lambda p: p.stat().st_size)
    print(json.dumps({"bench": "disk", "file": shard.name, "size_gb": round(shard.stat().st_size / 1e9, 2),
                      "direct_read_gb_s": round(disk_read_gb_s(shard), 2)}), flush=True)
    for offload in ["disk"] + ([] if args.no_memory else ["none"]):
        subprocess.run([sys.executable, __file__, "--child", offload, str(directory), "--tokens", str(args.tokens),
                        "--dtype", args.dtype], check=True)


if __name__ == "__main__":
    main()
