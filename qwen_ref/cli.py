"""The qwen-ref command line: run | inspect | serve | score | compare | merge-lora, with one set of load flags."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from qwen_ref.checkpoint.weights import OFFLOADS
from qwen_ref.dtypes import DTYPES
from qwen_ref.errors import QwenRefError
from qwen_ref.lora import write_merged_checkpoint
from qwen_ref.models.backends import DECODE_LINEARS, KERNELS
from qwen_ref.oracle import add_compare_arguments, add_score_arguments, run_compare, run_score
from qwen_ref.qwen import Qwen, load
from qwen_ref.server.cli import add_serve_arguments, run_server
from qwen_ref.workers_ai.generate import generate
from qwen_ref.workers_ai.inspect import inspect_steps
from qwen_ref.workers_ai.validate import validate_input

# flag -> request field, with its type
PARAM_FLAGS = {
    "max_tokens": int,
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "seed": int,
    "repetition_penalty": float,
    "frequency_penalty": float,
    "presence_penalty": float,
}


def _read_json(source: str, what: str) -> Any:
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
        return json.loads(text)
    except OSError as e:
        raise QwenRefError(f"{what}: cannot read {source!r} ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise QwenRefError(f"{what}: {source!r} is not valid JSON ({e})") from None


def add_load_arguments(p: argparse.ArgumentParser, *, source: bool = True) -> None:
    """The model-loading flags every command that loads a model shares: qwen_ref.load's options."""
    if source:
        p.add_argument("source", help="'tiny' (the embedded default model), 'tiny:PRESET', a checkpoint directory, "
                                      "a hub repo id (Qwen/Qwen2.5-0.5B-Instruct) or a Workers AI id (@cf/qwen/...)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="compute dtype (default: the checkpoint's torch_dtype); float64 is ground truth")
    p.add_argument("--device", default="cpu")
    p.add_argument("--lora", default=None, help="a LoRA adapter directory (or a name in --lora-dir) to merge")
    p.add_argument("--lora-dir", default=None, help="a directory of named LoRA adapters for the request's lora")
    p.add_argument("--kernels", choices=list(KERNELS), default="torch",
                   help="torch (default): the PyTorch ops; triton: the Triton kernels; auto: triton on CUDA")
    p.add_argument("--offload", choices=list(OFFLOADS), default="none",
                   help="none (default); disk: the decoder layers stay in the safetensors files and stream "
                        "through memory one at a time (same logits; for checkpoints larger than memory)")
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor parallelism over N ranks, started here (gloo on CPUs, NCCL on GPUs); see docs/scale.md")
    p.add_argument("--tp-exact", action="store_true",
                   help="with --tp: the one-rank arithmetic bit for bit (each layer's weights gathered whole; slower)")
    p.add_argument("--decode-linear", choices=list(DECODE_LINEARS), default="auto",
                   help="auto (default): invariant on the CPU in float32/bfloat16/float16 where it builds, else torch; "
                        "torch: BLAS, decode logits bit-equal to transformers; invariant: the batch-invariant CPU "
                        "kernel (memory speed; n samples share a forward; see docs/performance.md)")


def load_options(args: argparse.Namespace) -> dict[str, Any]:
    """qwen_ref.load's keyword arguments from the shared load flags."""
    return {"device": args.device, "dtype": args.dtype, "lora": args.lora, "lora_dir": args.lora_dir,
            "kernels": args.kernels, "decode_linear": args.decode_linear, "offload": args.offload,
            "tp": args.tp, "tp_exact": args.tp_exact}


def _load(args: argparse.Namespace) -> Qwen:
    return load(args.source, progress=True, **load_options(args))


def _add_request_args(p: argparse.ArgumentParser) -> None:
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="a prompt (templated as one user message unless --raw)")
    what.add_argument("--messages", metavar="FILE", help="a JSON file: a list of {role, content} messages")
    what.add_argument("--input", metavar="FILE", help="a whole Workers AI request body as JSON ('-' for stdin)")
    p.add_argument("--raw", action="store_true", default=None, help="feed --prompt as-is, no chat template")
    p.add_argument("--tools", metavar="FILE", help="a JSON file: the request's tools list")
    p.add_argument("--json-schema", metavar="FILE", help="JSON mode with this JSON Schema")
    p.add_argument("--json-object", action="store_true", help="JSON mode: any JSON object")
    for name, kind in PARAM_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None, dest=name)


def build_request(args: argparse.Namespace) -> dict[str, Any]:
    """The request body the flags describe; flags override fields of --input."""
    if args.input is not None:
        body = _read_json(args.input, "--input")
        if not isinstance(body, dict):
            raise QwenRefError("--input: the request body must be a JSON object")
    elif args.messages is not None:
        messages = _read_json(args.messages, "--messages")
        body = messages if isinstance(messages, dict) else {"messages": messages}
    else:
        body = {"prompt": args.prompt}
    if args.raw:
        body["raw"] = True
    if args.tools is not None:
        body["tools"] = _read_json(args.tools, "--tools")
    if args.json_schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": _read_json(args.json_schema,
                                                                                  "--json-schema")}
    elif args.json_object:
        body["response_format"] = {"type": "json_object"}
    for name in PARAM_FLAGS:
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    if getattr(args, "stream", False):
        body["stream"] = True
    return body


def _run(args: argparse.Namespace) -> int:
    body = build_request(args)
    qwen = _load(args)
    ignored: list[str] = []
    validate_input(body, strict=args.strict, ignored=ignored)  # the refusal or the list, before the model runs
    if ignored:
        print(f"qwen-ref: ignored unknown request keys: {', '.join(ignored)}", file=sys.stderr)
    out = generate(qwen, body, strict=args.strict)
    if not body.get("stream"):
        print(json.dumps(out, ensure_ascii=False, indent=2))
        return 0
    for event in out:  # Server-Sent Events: print the text as it arrives, usage to stderr
        data = event.decode("utf-8").removeprefix("data: ").strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        sys.stdout.write(chunk.get("response", ""))
        sys.stdout.flush()
        if "usage" in chunk:
            sys.stdout.write("\n")
            extra = {k: v for k, v in chunk.items() if k not in ("response", "p")}
            print(json.dumps(extra, ensure_ascii=False), file=sys.stderr)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    body = build_request(args)
    body.pop("stream", None)
    qwen = _load(args)
    for table in inspect_steps(qwen, body, steps=args.steps, top=args.top, plot=args.plot):
        print(table)
        print()
    return 0


def _merge_lora(args: argparse.Namespace) -> int:
    print(write_merged_checkpoint(args.source, args.adapter, args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen-ref", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one Workers AI request (prints the output JSON, or streams text)")
    add_load_arguments(run)
    _add_request_args(run)
    run.add_argument("--stream", action="store_true", help="stream the text as it is generated (SSE)")
    run.add_argument("--strict", action="store_true",
                     help="refuse request keys the Workers AI schema does not know (default: ignore them, as the "
                          "service does, and name them on stderr)")
    run.set_defaults(func=_run)

    ins = sub.add_parser("inspect", help="show the next-token distribution after every sampler stage")
    add_load_arguments(ins)
    _add_request_args(ins)
    ins.add_argument("--steps", type=int, default=1, help="how many tokens to trace (default 1)")
    ins.add_argument("--top", type=int, default=10, help="candidates shown per stage (default 10)")
    ins.add_argument("--plot", metavar="PNG", help="write a plot of the distribution across stages "
                                                   "(needs matplotlib: pip install qwen-ref[plot])")
    ins.set_defaults(func=_inspect)

    merge = sub.add_parser("merge-lora", help="write a checkpoint with a PEFT LoRA adapter merged in")
    merge.add_argument("source", help="the base model, as qwen_ref.load takes it")
    merge.add_argument("adapter", help="a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    merge.add_argument("--out", required=True, help="the directory to write (HF layout, safetensors)")
    merge.set_defaults(func=_merge_lora)

    score = sub.add_parser("score", help="teacher-force token sequences: reference logprobs per position (JSONL)")
    add_load_arguments(score)
    add_score_arguments(score)
    score.set_defaults(func=lambda args: run_score(args, lambda: _load(args)))
    compare = sub.add_parser("compare", help="check another backend's generations and logprobs against the "
                                             "reference; exit 1 when a position is flagged")
    add_load_arguments(compare)
    add_compare_arguments(compare)
    compare.set_defaults(func=lambda args: run_compare(args, lambda: _load(args)))

    serve = sub.add_parser("serve", help="serve models over HTTP: the Workers AI REST API and OpenAI chat "
                                         "completions (needs pip install 'qwen-ref[serve]')")
    add_serve_arguments(serve)
    add_load_arguments(serve, source=False)
    serve.set_defaults(func=lambda args: run_server(args, load_options(args)))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("steps", "top"):
        if getattr(args, name, 1) < 1:
            print(f"qwen-ref: error: --{name} must be >= 1", file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except QwenRefError as e:
        print(f"qwen-ref: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
