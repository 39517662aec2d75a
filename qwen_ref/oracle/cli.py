"""The oracle's commands: `qwen-ref score` and `qwen-ref compare`. Each adds only its own flags; the reference
model's (source, --dtype, --device, --lora, ...) are qwen_ref/cli.py's shared load flags, and `load()` gives
the model they describe."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qwen_ref.errors import QwenRefError
from qwen_ref.oracle.compare import compare
from qwen_ref.oracle.files import ScoreInputError, json_objects, open_output
from qwen_ref.oracle.formats import FORMATS, read_backend_file
from qwen_ref.oracle.score import score
from qwen_ref.oracle.thresholds import LOGPROB_TOLERANCE, Thresholds


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    """score's own flags; the reference model's (source, --dtype, ...) are the CLI's shared load flags."""
    parser.add_argument("--input", required=True, metavar="FILE",
                        help="JSONL of sequences ('-' for stdin): {prompt_ids, token_ids}, {prompt, completion}, "
                             "{request, completion}, or {text}; optional params and id")
    parser.add_argument("--output", default="-", metavar="FILE", help="per-position JSONL (default: stdout)")
    parser.add_argument("--top-n", type=int, default=5, help="alternatives per position (default 5)")


def run_score(args: argparse.Namespace, load: Callable[[], Any]) -> int:
    """load() gives the reference model (qwen_ref.Qwen) the shared load flags describe."""
    if args.top_n < 0:
        raise QwenRefError("--top-n must be >= 0")
    qwen = load()
    items = (obj for _, obj in json_objects(Path(args.input), ScoreInputError))
    with open_output(args.output) as f:
        for record in score(qwen, items, top_n=args.top_n):
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return 0


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    """compare's own flags; the reference model's (source, --dtype, ...) are the CLI's shared load flags."""
    parser.add_argument("--backend", required=True, metavar="FILE",
                        help="the backend's generations with per-token logprobs (JSONL, a JSON array or one JSON "
                             "object); {\"request\": ..., \"response\": ...} lines carry the request")
    parser.add_argument("--format", choices=FORMATS, default="auto", help="default: detected per line")
    parser.add_argument("--output", metavar="FILE", help="per-position details as JSONL")
    parser.add_argument("--plot", metavar="PNG", help="plot the per-position error (needs matplotlib)")
    parser.add_argument("--backend-dtype", choices=list(LOGPROB_TOLERANCE), default=None,
                        help="the dtype the backend computed in; picks the tolerances (default: the checkpoint's)")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="|logprob difference| tolerance; the others derive from it (overrides --backend-dtype)")
    parser.add_argument("--params", metavar="JSON", default=None,
                        help="sampling fields for generations that carry none, e.g. '{\"temperature\": 0}'")
    parser.add_argument("--logprobs-of", choices=["raw", "final"], default=None,
                        help="which distribution the backend's logprobs are of (default: from the format)")


def run_compare(args: argparse.Namespace, load: Callable[[], Any]) -> int:
    """Prints the summary; exit status 0 when nothing is flagged, 1 when something is. load() gives the
    reference model (qwen_ref.Qwen) the shared load flags describe."""
    params = None
    if args.params is not None:
        try:
            params = json.loads(args.params)
        except json.JSONDecodeError as e:
            raise QwenRefError(f"--params: not valid JSON ({e.msg})") from None
        if not isinstance(params, dict):
            raise QwenRefError("--params: expected a JSON object of sampling fields")
    if args.tolerance is not None and not args.tolerance > 0:
        raise QwenRefError("--tolerance must be > 0")
    records = read_backend_file(args.backend, args.format)
    qwen = load()
    thresholds = None if args.tolerance is None else Thresholds.from_logprob(args.tolerance)
    report = compare(qwen, records, thresholds=thresholds, backend_dtype=args.backend_dtype, params=params,
                     logprobs_of=args.logprobs_of)
    print(report.format())
    if args.output:
        report.write_jsonl(args.output)
    if args.plot:
        report.plot(args.plot)
    return 0 if report.ok else 1

