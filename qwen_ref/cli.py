"""The qwen-ref command line."""

from __future__ import annotations

import argparse
import sys
import time

from .errors import QwenRefError


def _add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="'tiny' (the embedded default model), 'tiny:PRESET', a checkpoint directory, "
                                  "a hub repo id (Qwen/Qwen2.5-0.5B-Instruct) or a Workers AI id (@cf/qwen/...)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"], default=None,
                   help="compute dtype (default: the checkpoint's torch_dtype)")
    p.add_argument("--device", default="cpu")


def _run(args: argparse.Namespace) -> int:
    from .detok import IncrementalDetokenizer
    from .engine import decode
    from .loader import load

    qwen = load(args.source, device=args.device, dtype=args.dtype, progress=True)
    if qwen.tokenizer is None:
        raise QwenRefError(f"{qwen.path}: no tokenizer files (tokenizer.json); cannot encode a text prompt")
    prompt_ids = qwen.tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise QwenRefError("--prompt: the prompt encodes to no tokens; give some text")
    detok = IncrementalDetokenizer(qwen.tokenizer)
    t0 = time.perf_counter()
    n = 0
    for step in decode(qwen.model, [prompt_ids], args.max_tokens, stop_ids=qwen.eos_token_ids):
        token = step.tokens[0]
        if token is None:
            break
        n += 1
        # a split multi-byte character is held back until its next token arrives
        sys.stdout.write(detok.push(token))
        sys.stdout.flush()
    sys.stdout.write(detok.flush() + "\n")
    dt = time.perf_counter() - t0
    print(f"[{len(prompt_ids)} prompt tokens, {n} generated, greedy, {dt:.2f}s, {n / dt:.1f} tok/s, "
          f"{qwen.dtype} on {qwen.device}]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen-ref", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="greedy-decode a raw text prompt (no chat template)")
    _add_source_args(run)
    run.add_argument("--prompt", required=True)
    run.add_argument("--max-tokens", type=int, default=64)
    run.set_defaults(func=_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "max_tokens", 1) < 1:
        print("qwen-ref: error: --max-tokens must be >= 1", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except QwenRefError as e:
        print(f"qwen-ref: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
