"""Greedy generation speed: qwen_ref against transformers on the same weights, in one process.

Makes (or reuses) random-weight checkpoints with the exact shapes of Qwen2.5-0.5B-Instruct and
Qwen1.5-0.5B-Chat, measures the machine's memory read bandwidth, then for each case times transformers'
generate and ours on the same prompt tokens after a warm-up. Decode tok/s excludes the prefill: it is
(N - 1) / (time(N new tokens) - time(1 new token)). Ours runs once per --decode-linear choice: "torch" (BLAS,
bit-equal to transformers) and "invariant" (the batch-invariant CPU kernel). One JSON line per case, then a table.

    python benchmarks/bench_generate.py [--preset P ...] [--dtype D ...] [--prompt-len 128] [--new-tokens 64]
                                        [--decode-linear torch invariant]
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

from qwen_ref.checkpoint.tiny import make_tiny_checkpoint
from qwen_ref.disk_cache import cache_root
from qwen_ref.engine import generate_ids
from qwen_ref.qwen import load

PRESETS = ("qwen2.5-0.5b-shape", "qwen1.5-0.5b-shape")


def memory(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s that a full-thread reduction reads from memory (best of `repeats`)."""
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def checkpoint(preset: str, with_tokenizer: bool = False) -> Path:
    """The preset's random-weight checkpoint (bfloat16), built once into the cache."""
    path = cache_root() / "bench" / (f"{preset}-with-tokenizer" if with_tokenizer else preset)
    if not (path / "config.json").is_file():
        make_tiny_checkpoint(preset, path, dtype="bfloat16", with_tokenizer=with_tokenizer)
    return path


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter once, the input embedding only when it is
    also the lm_head (a gather of one row otherwise)."""
    seen, total = set(), 0
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    for name, p in model.named_parameters():
        if id(p) in seen or (name == "model.embed_tokens.weight" and not tied):
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total


def kv_bytes_per_token(model, context: int, dtype: torch.dtype) -> int:
    c = model.config
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * dtype.itemsize * context


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_ours(model, prompts, new_tokens: int, repeats: int) -> tuple[float, float]:
    generate_ids(model, prompts, 2)  # warm-up
    t1 = timed(lambda: generate_ids(model, prompts, 1), repeats)
    tn = timed(lambda: generate_ids(model, prompts, new_tokens), repeats)
    return t1, tn


def bench_hf(model, prompts, new_tokens: int, repeats: int) -> tuple[float, float]:
    from transformers import GenerationConfig

    ids = torch.tensor(prompts)
    model.generation_config = GenerationConfig(do_sample=False, pad_token_id=0, eos_token_id=None)

    def run(n):
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, attention_mask=torch.ones_like(ids))

    run(2)
    return timed(lambda: run(1), repeats), timed(lambda: run(new_tokens), repeats)


def decode_step_times(model, batch: int, context: int, repeats: int = 5, warmup: int = 2) -> list[float]:
    """ms of each timed decode step (one token per row) against a cache holding `context` positions per row,
    filled with random keys/values: the cost depends on the sizes, not the values."""
    from qwen_ref.models.kv_cache import KVCache

    cache = KVCache(model.config, batch, context + warmup + repeats + 1, dtype=model.lm_head.weight.dtype,
                    device=model.lm_head.weight.device)
    for layer in range(model.config.num_hidden_layers):
        cache.k[layer].normal_()
        cache.v[layer].normal_()
    cache.lengths.fill_(context)
    tokens = torch.randint(0, 151643, (batch, 1), device=cache.lengths.device)
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            t = time.perf_counter()
            model(tokens, cache=cache)
            if i >= warmup:
                times.append((time.perf_counter() - t) * 1e3)
    return times


def context_sweep(model, dtype: torch.dtype, contexts: list[int], batch: int) -> list[dict]:
    """Decode-step cost at growing cached lengths against what the extra KV bytes predict."""
    base = contexts[0]
    base_ms = statistics.median(decode_step_times(model, batch, base))
    base_bytes = weight_bytes_per_token(model) + batch * kv_bytes_per_token(model, base, dtype)
    rows = []
    for ctx in contexts:
        ms = base_ms if ctx == base else statistics.median(decode_step_times(model, batch, ctx))
        step_bytes = weight_bytes_per_token(model) + batch * kv_bytes_per_token(model, ctx, dtype)
        rows.append({"bench": "context", "context": ctx, "batch": batch, "dtype": str(dtype).removeprefix("torch."),
                     "step_ms": round(ms, 2), "step_bytes": step_bytes,
                     "time_ratio_vs_base": round(ms / base_ms, 3),
                     "bytes_ratio_vs_base": round(step_bytes / base_bytes, 3)})
    return rows


def bench_case(args, preset, path, dtype, device, decode_linear, prompts, bandwidth) -> dict:
    reset_peak()
    before = memory("VmRSS")
    qwen = load(path, dtype=dtype, device=device, decode_linear=decode_linear)
    load_peak = memory("VmHWM") - before
    model = qwen.model
    wbytes = weight_bytes_per_token(model)
    t1, tn = bench_ours(model, prompts, args.new_tokens, args.repeats)
    row = {
        "bench": "generate", "preset": preset, "dtype": str(dtype).removeprefix("torch."), "device": str(device),
        "decode_linear": decode_linear, "batch": args.batch, "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "threads": args.threads,
        "prefill_tok_s": round(args.batch * args.prompt_len / t1, 1),
        "decode_tok_s": round(args.batch * (args.new_tokens - 1) / (tn - t1), 2),
        "weight_bytes": wbytes, "load_peak_rss_bytes": load_peak,
        "load_peak_over_weights": round(load_peak / sum(p.numel() * p.element_size() for p in model.parameters()), 3),
    }
    context = args.prompt_len + args.new_tokens // 2
    step_bytes = wbytes + args.batch * kv_bytes_per_token(model, context, dtype)
    row["bytes_per_step"] = step_bytes
    if bandwidth is not None:
        row["read_bandwidth_gb_s"] = round(bandwidth / 1e9, 1)
        roofline = bandwidth / step_bytes  # decode steps per second at full bandwidth
        row["roofline_tok_s"] = round(args.batch * roofline, 2)
        row["roofline_fraction"] = round(row["decode_tok_s"] / (args.batch * roofline), 3)
    if args.context_sweep:
        for r in context_sweep(model, dtype, sorted(args.context_sweep), args.batch):
            print(json.dumps({"preset": preset, "decode_linear": decode_linear, **r}), flush=True)
    return row


def bench_hf_case(path, dtype, device, prompts, args) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return bench_hf(hf, prompts, args.new_tokens, args.repeats)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", nargs="+", default=list(PRESETS), choices=PRESETS)
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-hf", action="store_true", help="time only qwen_ref")
    ap.add_argument("--decode-linear", nargs="+", default=["torch", "invariant"], choices=["torch", "invariant"])
    ap.add_argument("--context-sweep", type=int, nargs="*", default=None, metavar="N",
                    help="also time one decode step at these cached lengths (e.g. 128 2048 8192) and compare the "
                         "cost growth with the growth of the bytes a step reads")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    bandwidth = read_bandwidth() if device.type == "cpu" else None
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 151643, (args.batch, args.prompt_len), generator=g).tolist()
    rows = []
    for preset in args.preset:
        path = checkpoint(preset)
        for dtype_name in args.dtype:
            dtype = getattr(torch, dtype_name)
            hf_times = None
            for decode_linear in args.decode_linear if device.type == "cpu" else ["torch"]:
                row = bench_case(args, preset, path, dtype, device, decode_linear, prompts, bandwidth)
                if not args.skip_hf:
                    hf_times = hf_times or bench_hf_case(path, dtype, device, prompts, args)
                    h1, hn = hf_times
                    row["hf_prefill_tok_s"] = round(args.batch * args.prompt_len / h1, 1)
                    row["hf_decode_tok_s"] = round(args.batch * (args.new_tokens - 1) / (hn - h1), 2)
                    row["decode_ratio_vs_hf"] = round(row["decode_tok_s"] / row["hf_decode_tok_s"], 2)
                    row["prefill_ratio_vs_hf"] = round(row["prefill_tok_s"] / row["hf_prefill_tok_s"], 2)
                rows.append(row)
                print(json.dumps(row), flush=True)

    print(f"\n{'preset':<20}{'dtype':<10}{'linear':<11}{'prefill':>10}{'decode':>9}{'hf dec':>9}{'ratio':>7}"
          f"{'roofline':>10}", file=sys.stderr)
    for r in rows:
        print(f"{r['preset']:<20}{r['dtype']:<10}{r['decode_linear']:<11}{r['prefill_tok_s']:>10}{r['decode_tok_s']:>9}"
              f"{r.get('hf_decode_tok_s', '-'):>9}{r.get('decode_ratio_vs_hf', '-'):>7}"
              f"{r.get('roofline_fraction', '-'):>10}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
