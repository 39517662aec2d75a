"""The engine under load: a short request's latency while a long prompt is prefilled, and prefill memory.

    python benchmarks/bench_engine.py latency [--source tiny] [--long 4000] [--short-tokens 16] [--chunk N]
    python benchmarks/bench_engine.py memory [--tokens 32768] [--layers 2] [--baseline-tree DIR]

latency: p50/p99 of a 16-token request alone (idle), then while 4,000-token prompts are prefilled one after
another on the same engine (one engine thread, requests submitted as clients would), and their ratio.
memory: a fresh process loads a model with the Qwen2.5-0.5B shapes (fewer layers: per-layer activation memory is
what prefill adds, and the KV cache is measured, not estimated) and prefills one prompt; it reports the peak RSS
beyond the weights and the final KV cache. --baseline-tree runs the same measurement on another checkout (the
code before the engine, whose attention held the whole score matrix) at --baseline-tokens.
One JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {f"p{q}": round(ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))], 4)
            for q in (50, 99)}


def latency(args: argparse.Namespace) -> None:
    import qwen_ref
    from qwen_ref.engine import Engine, Failed, Finished
    from qwen_ref.workers_ai.request import prepare

    torch.set_num_threads(args.threads)
    qwen = qwen_ref.load(args.source)
    short = prepare(qwen, {"prompt": "Tell me a story", "max_tokens": args.short_tokens, "seed": 1,
                           "temperature": 1.0})
    long = prepare(qwen, {"prompt": "word " * args.long, "raw": True, "max_tokens": 1, "seed": 2})
    options = {k: v for k, v in (("prefill_chunk", args.chunk), ("prefill_ratio", args.ratio)) if v is not None}
    engine = Engine(qwen.model, **options)
    engine.start()

    def submit(p) -> threading.Event:
        done = threading.Event()
        fresh = prepare(qwen, p.inputs)  # a new sampler state per run: the same tokens every time
        engine.add(fresh.engine_request(qwen), lambda e: isinstance(e, Finished | Failed) and done.set())
        return done

    def timed_short() -> float:
        t = time.perf_counter()
        submit(short).wait()
        return time.perf_counter() - t

    try:
        for _ in range(3):
            timed_short()  # warm-up
        idle = [timed_short() for _ in range(args.samples)]
        loaded: list[float] = []
        prefills = 0
        t0 = time.perf_counter()
        while len(loaded) < args.samples:
            long_done = submit(long)
            prefills += 1
            while not long_done.is_set() and len(loaded) < args.samples:
                loaded.append(timed_short())
        wall = time.perf_counter() - t0
    finally:
        engine.close()
    line = {"bench": "latency_during_prefill", "source": args.source, "prefill_chunk": engine.runner.prefill_chunk,
            "prefill_ratio": engine.prefill_ratio,
            "decode_mode": engine.mode, "long_prompt_tokens": len(long.prompt_ids), "short_tokens": args.short_tokens,
            "idle_s": percentiles(idle), "loaded_s": percentiles(loaded), "long_prompts_prefilled": prefills,
            "wall_s": round(wall, 2)}
    line["ratio_p50"] = round(line["loaded_s"]["p50"] / line["idle_s"]["p50"], 3)
    line["ratio_p99"] = round(line["loaded_s"]["p99"] / line["idle_s"]["p99"], 3)
    print(json.dumps(line), flush=True)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def memory_child(args: argparse.Namespace) -> None:
    """Runs in a fresh process (possibly on another checkout): prefill one prompt, print the memory."""
    import qwen_ref
    from qwen_ref.engine import generate_ids  # both checkouts have it (before the engine: one batched loop)

    torch.set_num_threads(args.threads)
    qwen = qwen_ref.load(args.checkpoint, dtype=args.dtype)
    ids = [int(i) for i in torch.randint(0, 150000, (args.tokens,), generator=torch.Generator().manual_seed(0))]
    rss_loaded = _status("VmRSS")
    t = time.perf_counter()
    generate_ids(qwen.model, [ids], 1)
    kind = "engine" if hasattr(qwen_ref, "engine") and hasattr(qwen_ref.engine, "Engine") else "before"
    seconds = time.perf_counter() - t
    cfg = qwen.config
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * qwen.dtype.itemsize * args.tokens
    peak = _status("VmHWM")
    print(json.dumps({"kind": kind, "rss_loaded": rss_loaded, "peak": peak, "kv_bytes": kv, "seconds": seconds}))


def memory(args: argparse.Namespace) -> None:
    from qwen_ref.checkpoint.tiny import make_tiny_checkpoint
    from qwen_ref.disk_cache import cache_root

    path = cache_root() / "bench" / f"qwen2.5-0.5b-shape-{args.layers}-layers"
    if not (path / "config.json").is_file():
        make_tiny_checkpoint("qwen2.5-0.5b-shape", path, layers=args.layers)
    runs = [(Path(__file__).resolve().parents[1], args.tokens)]
    if args.baseline_tree:
        runs.append((Path(args.baseline_tree).resolve(), args.baseline_tokens))
    for tree, tokens in runs:
        cmd = [sys.executable, str(Path(__file__).resolve()), "memory-child", "--checkpoint", str(path),
               "--tokens", str(tokens), "--dtype", args.dtype, "--threads", str(args.threads)]
        env = {**os.environ, "PYTHONPATH": str(tree)}
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree, check=False)
        if out.returncode != 0:
            print(json.dumps({"bench": "prefill_memory", "tree": str(tree), "error": out.stderr[-2000:]}))
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        extra = r["peak"] - r["rss_loaded"] - r["kv_bytes"]
        print(json.dumps({"bench": "prefill_memory", "code": r["kind"], "tree": str(tree), "preset_shapes":
                          "qwen2.5-0.5b-shape", "layers": args.layers, "dtype": args.dtype, "prompt_tokens": tokens,
                          "rss_after_load_gib": round(r["rss_loaded"] / 2**30, 3),
                          "kv_cache_gib": round(r["kv_bytes"] / 2**30, 3),
                          "peak_beyond_weights_and_kv_gib": round(extra / 2**30, 3),
                          "prefill_s": round(r["seconds"], 1)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    lat = sub.add_parser("latency")
    lat.add_argument("--source", default="tiny")
    lat.add_argument("--long", type=int, default=4000, help="words in the long prompt (about one token each)")
    lat.add_argument("--short-tokens", type=int, default=16)
    lat.add_argument("--samples", type=int, default=40)
    lat.add_argument("--chunk", type=int, default=None, help="prefill_chunk (default: the engine's)")
    lat.add_argument("--ratio", type=float, default=None, help="prefill_ratio (default: the engine's)")
    lat.add_argument("--threads", type=int, default=2)
    mem = sub.add_parser("memory")
    mem.add_argument("--tokens", type=int, default=32768)
    mem.add_argument("--layers", type=int, default=2)
    mem.add_argument("--dtype", default="float32")
    mem.add_argument("--threads", type=int, default=2)
    mem.add_argument("--baseline-tree", default=None)
    mem.add_argument("--baseline-tokens", type=int, default=4096)
    child = sub.add_parser("memory-child")
    child.add_argument("--checkpoint", required=True)
    child.add_argument("--tokens", type=int, required=True)
    child.add_argument("--dtype", default="float32")
    child.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    {"latency": latency, "memory": memory, "memory-child": memory_child}[args.what](args)


if __name__ == "__main__":
    main()
