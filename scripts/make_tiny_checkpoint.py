"""Write a deterministic random-weight Qwen2 checkpoint in the exact HF layout."""

import argparse
import sys

from qwen_ref.checkpoint.tiny import PRESETS, make_tiny_checkpoint
from qwen_ref.errors import QwenRefError


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="stored dtype (default: the preset's)")
    p.add_argument("--no-tokenizer", action="store_true", help="write only config and weights")
    args = p.parse_args()
    try:
        out = make_tiny_checkpoint(args.preset, args.out, seed=args.seed, dtype=args.dtype,
                                   with_tokenizer=not args.no_tokenizer)
    except QwenRefError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
