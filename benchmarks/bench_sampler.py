"""Cost of one sampler step (qwen_ref.sampling.sample + accept) at a given batch and vocabulary size.

    python benchmarks/bench_sampler.py                      # vocab 151936, batch 1 and 32, every parameter on
    python benchmarks/bench_sampler.py --case top_p_only    # no top_k: top_p over the whole vocabulary

    python benchmarks/bench_sampler.py --against-decode     # also time a Qwen2.5-0.5B-shaped decode step

Prints one JSON line per case. With --against-decode, the same run times one decode step of the
Qwen2.5-0.5B-shaped model (random weights, 576 cached positions per row) at the same batch size and reports
the sampler's cost as a fraction of it.
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
    parser.add_argument("--against-decode", action="store_true",
                        help="also time a decode step of the Qwen2.5-0.5B-shaped model at the same batch")
    parser.add_argument("--model-dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args(argv)
    model = None
    if args.against_decode:
        from bench_generate import checkpoint  # this folder is on sys.path when run as a script

        from qwen_ref.qwen import load

        model = load(checkpoint("qwen2.5-0.5b-shape"), dtype=args.model_dtype).model
    for batch in args.batch:
        result = measure(batch, args.vocab, case=args.case, repeats=args.repeats, logprobs=args.logprobs,
                         dtype=getattr(torch, args.dtype), device=args.device)
        if model is not None:
            from bench_generate import DecodeSteps

            times = [t * 1e3 for t in DecodeSteps(model, batch, context=576, steps=10).run(10)]  # ms
            result.update(decode_median_ms=round(statistics.median(times), 3), decode_min_ms=round(min(times), 3),
                          model_dtype=args.model_dtype)
            result["sampler_fraction_of_decode"] = round(result["median_ms"] / result["decode_median_ms"], 4)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
