"""Cost of one sampler step (qwen_ref.sampling.sample + accept) at a given batch and vocabulary size.

    python benchmarks/bench_sampler.py                      # vocab 151936, batch 1 and 32, every parameter on
    python benchmarks/bench_sampler.py --case top_p_only    # no top_k: top_p over the whole vocabulary

Prints one JSON line per case. `measure()` is reusable, e.g. to compare with a model decode step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from qwen_ref.sampling import RequestState, sample

CASES: dict[str, dict[str, float | int]] = {
    "all": {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.1,
            "frequency_penalty": 0.5, "presence_penalty": 0.3},
    "top_p_only": {"temperature": 0.7, "top_p": 0.9},
    "temperature_only": {"temperature": 0.6},
    "greedy": {"temperature": 0.0},
}


def _quantile(sorted_ms: list[float], q: float) -> float:
    return sorted_ms[min(len(sorted_ms) - 1, round(q * (len(sorted_ms) - 1)))]


def measure(batch: int, vocab: int, *, case: str = "all", repeats: int = 30, warmup: int = 3,
            prompt_len: int = 512, output_len: int = 64, dtype: torch.dtype = torch.float32,
            device: str = "cpu", logprobs: int | None = None, seed: int = 0) -> dict:
    """Median and quantiles (ms) of one decode-loop sampler step: sample() for the whole batch, then
    accept() on every row. Each row has a history of prompt_len + output_len random tokens."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, vocab, generator=g) * 3).to(device=device, dtype=dtype)
    rows = []
    for b in range(batch):
        state = RequestState.start({**CASES[case], "seed": b + 1},
                                   torch.randint(0, vocab, (prompt_len,), generator=g).tolist())
        state.penalties.add_output(torch.randint(0, vocab, (output_len,), generator=g).tolist())
        rows.append(state)
    times = []
    for i in range(warmup + repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        tokens, _ = sample(logits, rows, logprobs=logprobs)
        for row, token in zip(rows, tokens.tolist(), strict=True):
            row.accept(token)
        elapsed = (time.perf_counter() - start) * 1e3
        if i >= warmup:
            times.append(elapsed)
    times.sort()
    return {
        "bench": "sampler", "case": case, "batch": batch, "vocab": vocab, "dtype": str(dtype).removeprefix("torch."),
        "device": device, "logprobs": logprobs, "threads": torch.get_num_threads(), "repeats": repeats,
        "median_ms": round(statistics.median(times), 3), "p10_ms": round(_quantile(times, 0.1), 3),
        "p90_ms": round(_quantile(times, 0.9), 3), "min_ms": round(times[0], 3), "max_ms": round(times[-1], 3),
        "per_row_ms": round(statistics.median(times) / batch, 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--case", choices=sorted(CASES), default="all")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--logprobs", type=int, default=None)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    for batch in args.batch:
        result = measure(batch, args.vocab, case=args.case, repeats=args.repeats, logprobs=args.logprobs,
                         dtype=getattr(torch, args.dtype), device=args.device)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
