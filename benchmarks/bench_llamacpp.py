"""Decode speed against llama.cpp, the CPU peer, on the same random-weight checkpoint, in one run.

    pip install -e '.[llamacpp]'     # llama-cpp-python built from its source distribution, and the converter's needs
    python benchmarks/bench_llamacpp.py [--preset qwen2.5-0.5b-shape ...] [--precision f32 bf16 f16]
                                        [--context 128] [--steps 32] [--threads 2]

For each preset, the checkpoint (random weights in the exact HF layout, the real vocabulary) is converted to GGUF at
each precision by llama.cpp's own converter, convert_hf_to_gguf.py, taken with its gguf-py from the source
distribution of the installed llama-cpp-python (pip download; cached beside the checkpoints). Then, with the same
threads and the same number of cached tokens:
- llama.cpp: a prompt of --context tokens, then --steps decode calls of one token each (Llama.eval: llama_decode
  and the copy of the logits), each timed;
- qwen_ref: load() at the same precision with each --decode-linear ("torch", the default, bit-equal to
  transformers; "invariant", the batch-invariant CPU kernel, float32 and bfloat16 only), then decode steps through a
  KV cache holding --context positions (bench_generate.decode_step_times: one forward of one token, with logits).
One JSON line per (preset, precision, decode_linear): each side's median ms per token and tokens/s, and ours /
llama.cpp. The machine's read bandwidth is measured in the same run, and each side's step is put against the
roofline of the bytes it reads (its weights at its precision; the KV bytes are under 1% at these lengths).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch
from bench_generate import checkpoint, decode_step_times, read_bandwidth, weight_bytes_per_token

from qwen_ref.disk_cache import cache_root
from qwen_ref.qwen import load

DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}


def converter(root: Path) -> Path:
    """llama.cpp's convert_hf_to_gguf.py from the sdist of the installed llama-cpp-python (its own gguf-py)."""
    from importlib.metadata import version

    release = version("llama-cpp-python")
    tree = root / f"llama_cpp_python-{release}"
    script = tree / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if not script.is_file():
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={release}", "-d", str(root)], check=True)
        with tarfile.open(root / f"llama_cpp_python-{release}.tar.gz") as sdist:
            sdist.extractall(root, filter="data")
    return script


def gguf(checkpoint: Path, precision: str, script: Path) -> Path:
    out = checkpoint.with_name(f"{checkpoint.name}-{precision}.gguf")
    if not out.is_file():
        env = {**os.environ, "PYTHONPATH": f"{script.parent / 'gguf-py'}{os.pathsep}{script.parent}"}
        subprocess.run([sys.executable, str(script), str(checkpoint), "--outtype", precision, "--outfile", str(out)],
                       check=True, env=env, capture_output=True)
    return out


def llamacpp_step_ms(path: Path, context: int, steps: int, threads: int) -> tuple[list[float], int]:
    """ms of each one-token decode after a --context prompt; and the GGUF file's bytes (its tensors, plus a few MB
    of header and vocabulary)."""
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=context + steps + 8, n_batch=512, n_threads=threads, n_threads_batch=threads,
                verbose=False)
    prompt = [(i * 7919) % 150000 for i in range(context)]
    llm.eval(prompt)
    times = []
    for i in range(steps):
        started = time.perf_counter()
        llm.eval([(context + i) * 31 % 150000])
        times.append((time.perf_counter() - started) * 1e3)
    return times[2:], path.stat().st_size  # the first two steps warm up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", nargs="+", default=["qwen2.5-0.5b-shape", "qwen1.5-0.5b-shape"])
    parser.add_argument("--precision", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--decode-linear", nargs="+", default=["torch", "invariant"], choices=["torch", "invariant"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = cache_root() / "bench"
    script = converter(root / "llama-cpp-sdist")
    bandwidth = read_bandwidth()
    print(json.dumps({"bench": "bandwidth", "read_gb_s": round(bandwidth / 1e9, 2), "threads": args.threads}),
          flush=True)
    for preset in args.preset:
        hf = checkpoint(preset, with_tokenizer=True)  # the converter reads the tokenizer files
        for precision in args.precision:
            theirs, their_bytes = llamacpp_step_ms(gguf(hf, precision, script), args.context, args.steps, args.threads)
            for decode_linear in args.decode_linear:
                if decode_linear == "invariant" and precision == "f16":
                    continue  # the invariant kernel takes float32 and bfloat16
                qwen = load(hf, dtype=DTYPES[precision], decode_linear=decode_linear)
                ours = decode_step_times(qwen.model, 1, args.context, repeats=args.steps - 2)
                our_bytes = weight_bytes_per_token(qwen.model)
                del qwen
                ours_ms, theirs_ms = statistics.median(ours), statistics.median(theirs)
                print(json.dumps({
                    "bench": "llamacpp", "preset": preset, "precision": precision, "decode_linear": decode_linear,
                    "context": args.context, "threads": args.threads, "ours_ms": round(ours_ms, 2),
                    "llamacpp_ms": round(theirs_ms, 2), "ours_tok_s": round(1e3 / ours_ms, 1),
                    "llamacpp_tok_s": round(1e3 / theirs_ms, 1),
                    "ratio_ours_vs_llamacpp": round(theirs_ms / ours_ms, 3),
                    "ours_roofline": round(our_bytes / bandwidth / (ours_ms / 1e3), 3),
                    "llamacpp_roofline": round(their_bytes / bandwidth / (theirs_ms / 1e3), 3),
                    "ours_weight_bytes": our_bytes, "llamacpp_model_bytes": their_bytes}), flush=True)


if __name__ == "__main__":
    main()
