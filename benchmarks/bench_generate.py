"""Greedy generation speed: qwen_ref against transformers on the same weights, in one process.

Makes (or reuses) random-weight checkpoints with the exact shapes of Qwen2.5-0.5B-Instruct and
Qwen1.5-0.5B-Chat, then for each case times transformers' generate and ours on the same prompt tokens after a
warm-up. Decode tok/s excludes the prefill: it is (N - 1) / (time(N new tokens) - time(1 new token)). Ours runs
once per --decode-linear choice: "torch" (BLAS, bit-equal to transformers) and "invariant" (the batch-invariant
CPU kernel, what load()'s default "auto" picks on the CPU). The roofline fraction is taken in --rounds rounds of
(read 1 GiB, time 8 decode steps at the mid-generation context): bytes a step reads / step time / that round's
read bandwidth, median over rounds (limits.py). The same rounds time the step's linears alone (StepLinears):
outside_linears_ms is what the step's other ops cost. One JSON line per case, then a table.

    python benchmarks/bench_generate.py [--preset P ...] [--dtype D ...] [--prompt-len 128] [--new-tokens 64]
                                        [--decode-linear torch invariant] [--rounds 7]
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
from limits import ReadProbe, interleaved, print_machine, roofline_fraction

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


class DecodeSteps:
    """Decode steps (one token per row, with logits) against a cache holding `context` positions per row, filled
    with random keys/values: the cost depends on the sizes, not the values. Each call runs `steps` steps from the
    same length and returns their seconds; the first call also warms up."""

    def __init__(self, model, batch: int, context: int, steps: int, warmup: int = 2):
        from qwen_ref.models.kv_cache import KVCache

        self.model, self.context, self.steps = model, context, steps
        weight = model.lm_head.weight
        self.cache = KVCache(model.config, batch, context + max(steps, warmup) + 1, dtype=weight.dtype,
                             device=weight.device)
        for layer in range(model.config.num_hidden_layers):
            self.cache.k[layer].normal_()
            self.cache.v[layer].normal_()
        self.tokens = torch.randint(0, 151643, (batch, 1), device=weight.device)
        self.run(warmup)

    def run(self, steps: int) -> list[float]:
        self.cache.lengths.fill_(self.context)
        times = []
        with torch.inference_mode():
            for _ in range(steps):
                t = time.perf_counter()
                self.model(self.tokens, cache=self.cache)
                times.append(time.perf_counter() - t)
        return times

    def __call__(self) -> float:
        return statistics.median(self.run(self.steps))


class StepLinears:
    """The linears of one decode step alone: every layer's q/k/v, o, gate/up and down and the lm_head, through the
    model's own backend, on inputs of the step's shapes. A step's time less this one is what its other ops cost
    (attention, RMSNorm, rope, cache writes, residual adds, Python). Median of `steps` runs, as DecodeSteps."""

    def __init__(self, model, batch: int, steps: int):
        c, w = model.config, model.lm_head.weight
        self.model, self.steps = model, steps
        self.x = {n: torch.randn(batch, 1, n, dtype=w.dtype, device=w.device)  # [B, 1, K]
                  for n in (c.hidden_size, c.num_attention_heads * c.head_dim, c.intermediate_size)}

    def run(self) -> float:
        c, linear = self.model.config, self.model.backends.linear
        hidden, heads, inner = (self.x[n] for n in (c.hidden_size, c.num_attention_heads * c.head_dim,
                                                     c.intermediate_size))
        t = time.perf_counter()
        with torch.inference_mode():
            for layer in self.model.model.layers:
                attn, mlp = layer.self_attn, layer.mlp
                linear(hidden, [attn.q_proj, attn.k_proj, attn.v_proj])
                linear(heads, [attn.o_proj])
                linear(hidden, [mlp.gate_proj, mlp.up_proj])
                linear(inner, [mlp.down_proj])
            linear(hidden, [self.model.lm_head])
        return time.perf_counter() - t

    def __call__(self) -> float:
        return statistics.median(self.run() for _ in range(self.steps))


def context_sweep(model, dtype: torch.dtype, contexts: list[int], batch: int, rounds: int, probe) -> list[dict]:
    """Decode-step cost at growing cached lengths against what the extra bytes predict: the contexts' steps are
    timed in turn in each round (limits.interleaved), and the cost ratio to the first context is taken per round."""
    steps = {ctx: DecodeSteps(model, batch, ctx, 8) for ctx in contexts}
    timed = interleaved(steps, rounds, probe)
    base = contexts[0]
    weights = weight_bytes_per_token(model)
    step_bytes = {ctx: weights + batch * kv_bytes_per_token(model, ctx, dtype) for ctx in contexts}
    rows = []
    for ctx in contexts:
        time_ratio = statistics.median(t / b for t, b in zip(timed[ctx]["seconds"], timed[base]["seconds"]))
        bytes_ratio = step_bytes[ctx] / step_bytes[base]
        rows.append({"bench": "context", "context": ctx, "batch": batch, "dtype": str(dtype).removeprefix("torch."),
                     "step_ms": round(timed[ctx]["s"] * 1e3, 2), "step_bytes": step_bytes[ctx],
                     "time_ratio_vs_base": round(time_ratio, 3), "bytes_ratio_vs_base": round(bytes_ratio, 3),
                     "cost_over_bytes": round(time_ratio / bytes_ratio, 3)})
        if probe is not None:
            rows[-1]["roofline_fraction"] = round(roofline_fraction(step_bytes[ctx], timed[ctx]["seconds"],
                                                                    timed[ctx]["probes"]), 3)
    return rows


def bench_case(args, preset, path, dtype, device, decode_linear, prompts, probe) -> dict:
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
    if probe is not None:
        # each round: the probe reads 1 GiB, then 8 decode steps at the mid-generation context are timed; then the
        # probe again and the same steps' linears alone
        timed = interleaved({"step": DecodeSteps(model, args.batch, context, 8),
                             "linears": StepLinears(model, args.batch, 8)}, args.rounds, probe)
        r, lin = timed["step"], timed["linears"]
        row["step_ms"] = round(r["s"] * 1e3, 2)
        row["linears_ms"] = round(lin["s"] * 1e3, 2)
        row["outside_linears_ms"] = round(statistics.median(a - b for a, b in zip(r["seconds"], lin["seconds"])) * 1e3,
                                          2)
        row["read_bandwidth_gb_s"] = round(r["probe_bytes_per_s"] / 1e9, 1)
        row["roofline_fraction"] = round(roofline_fraction(step_bytes, r["seconds"], r["probes"]), 3)
    if args.context_sweep:
        for r in context_sweep(model, dtype, sorted(args.context_sweep), args.batch, args.rounds, probe):
            print(json.dumps({"preset": preset, "decode_linear": decode_linear, **r}), flush=True)
    return row


def bench_hf_case(path, dtype, device, prompts, args) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return bench_hf(hf, prompts, args.new_tokens, args.repeats)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", nargs="+", default=list(PRESETS), choices=PRESETS)
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=7, help="rounds of (bandwidth probe, 8 decode steps) per case")
    ap.add_argument("--skip-hf", action="store_true", help="time only qwen_ref")
    ap.add_argument("--decode-linear", nargs="+", default=["torch", "invariant"], choices=["torch", "invariant"])
    ap.add_argument("--context-sweep", type=int, nargs="*", default=None, metavar="N",
                    help="also time one decode step at these cached lengths (e.g. 128 2048 8192) and compare the "
                         "cost growth with the growth of the bytes a step reads")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print_machine(args.threads)
    device = torch.device(args.device)

    probe = ReadProbe() if device.type == "cpu" else None
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 151643, (args.batch, args.prompt_len), generator=g).tolist()
    rows = []
    for preset in args.preset:
        path = checkpoint(preset)
        for dtype_name in args.dtype:
            dtype = getattr(torch, dtype_name)
            hf_times = None
            for decode_linear in args.decode_linear if device.type == "cpu" else ["torch"]:
                row = bench_case(args, preset, path, dtype, device, decode_linear, prompts, probe)
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
