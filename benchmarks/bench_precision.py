"""How far float32, float16 and bfloat16 runs are from the float64 ground truth, on the same weights.

For each checkpoint and dtype: the max and mean |logit error| and |logprob error| against float64 (teacher-
forced on the same random token sequences), and how often the greedy token agrees. One JSON line per case,
then a table.

    python benchmarks/bench_precision.py [--preset P ...] [--length 64] [--batch 4]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from qwen_ref.checkpoint.tiny import make_tiny_checkpoint
from qwen_ref.disk_cache import cache_root
from qwen_ref.qwen import load

DTYPES = ("float32", "float16", "bfloat16")


def checkpoint(preset: str):
    path = cache_root() / "bench" / f"precision-{preset}"
    if not (path / "config.json").is_file():
        stored = "bfloat16" if preset.endswith("0.5b-shape") else "float32"
        make_tiny_checkpoint(preset, path, dtype=stored, with_tokenizer=False)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", nargs="+", default=["qwen2.5", "qwen1.5", "qwen2.5-coder-32b-shape"])
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    rows = []
    for preset in args.preset:
        path = checkpoint(preset)
        ids = torch.randint(0, 151643, (args.batch, args.length), generator=g)
        with torch.inference_mode():
            truth = load(path, dtype="float64").model(ids)  # [B, T, V] float64
            truth_lp = torch.log_softmax(truth, dim=-1)
            for dtype in DTYPES:
                logits = load(path, dtype=dtype).model(ids).double()
                err = (logits - truth).abs()
                lp_err = (torch.log_softmax(logits, dim=-1) - truth_lp).abs()
                row = {
                    "bench": "precision", "preset": preset, "dtype": dtype, "positions": ids.numel(),
                    "max_abs_logit_error": float(err.max()), "mean_abs_logit_error": float(err.mean()),
                    "max_abs_logprob_error": float(lp_err.max()),
                    "greedy_agreement": float((logits.argmax(-1) == truth.argmax(-1)).double().mean()),
                    "logit_scale": float(truth.abs().max()),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\n{'preset':<26}{'dtype':<10}{'max |dlogit|':>14}{'mean |dlogit|':>15}{'max |dlogprob|':>16}"
          f"{'greedy agree':>14}", file=sys.stderr)
    for r in rows:
        print(f"{r['preset']:<26}{r['dtype']:<10}{r['max_abs_logit_error']:>14.3e}{r['mean_abs_logit_error']:>15.3e}"
              f"{r['max_abs_logprob_error']:>16.3e}{r['greedy_agreement']:>14.4f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
