"""Decode speed against llama.cpp, the CPU peer, on the same random-weight checkpoint, in one run.

    pip install -e '.[llamacpp]'     # llama-cpp-python built from its source distribution, and the converter's needs
    python benchmarks/bench_llamacpp.py [--preset qwen2.5-0.5b-shape ...] [--precision f32 bf16 f16]
                                        [--context 128] [--steps 8] [--rounds 7] [--threads 2]

For each preset, the checkpoint (random weights in the exact HF layout, the real vocabulary) is converted to GGUF at
each precision by llama.cpp's own converter, convert_hf_to_gguf.py, taken with its gguf-py from the source
distribution of the installed llama-cpp-python (pip download; cached beside the checkpoints). Then, with the same
threads and the same number of cached tokens:
- llama.cpp: a prompt of --context tokens, then one-token decode calls (Llama.eval: llama_decode and the copy of
  the logits), each timed;
- qwen_ref: load() at the same precision with each --decode-linear ("torch", the default, bit-equal to
  transformers; "invariant", the batch-invariant CPU kernel), then decode steps through a
  KV cache (bench_generate.DecodeSteps: one forward of one token, with logits).
All sides are loaded at once and timed in --rounds rounds; in each round each side reads the 1 GiB bandwidth probe
and then times --steps decode steps (limits.interleaved), so that both meet the same neighbours' load. One JSON
line per (preset, precision, decode_linear): each side's median ms per token, the median over rounds of
llama.cpp's time / ours, and each side's roofline fraction (the bytes it reads, its weights at its precision, over
its step time and its round's probe; the KV bytes are under 1% at these lengths).
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
from bench_generate import DecodeSteps, checkpoint, weight_bytes_per_token
from limits import ReadProbe, interleaved, print_machine, roofline_fraction

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


class LlamaSteps:
    """llama.cpp's decode: a prompt of `context` tokens, then each call times `steps` one-token Llama.eval calls
    (llama_decode and the copy of the logits) and returns their median seconds. Its cache keeps growing: over
    `rounds` calls the context goes from `context` to context + rounds * steps."""

    def __init__(self, path: Path, context: int, steps: int, rounds: int, threads: int):
        from llama_cpp import Llama

        self.steps, self.next = steps, context
        self.llm = Llama(str(path), n_ctx=context + (rounds + 1) * steps + 8, n_batch=512, n_threads=threads,
                         n_threads_batch=threads, verbose=False)
        self.llm.eval([(i * 7919) % 150000 for i in range(context)])
        self()  # warm-up

    def __call__(self) -> float:
        times = []
        for _ in range(self.steps):
            started = time.perf_counter()
            self.llm.eval([self.next * 31 % 150000])
            times.append(time.perf_counter() - started)
            self.next += 1
        return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", nargs="+", default=["qwen2.5-0.5b-shape", "qwen1.5-0.5b-shape"])
    parser.add_argument("--precision", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8, help="decode steps each side times per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--decode-linear", nargs="+", default=["torch", "invariant"], choices=["torch", "invariant"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print_machine(args.threads)
    root = cache_root() / "bench"
    script = converter(root / "llama-cpp-sdist")
    probe = ReadProbe()
    mid = args.context + args.rounds * args.steps // 2  # llama.cpp's cache grows through the rounds; ours sits mid-way
    for preset in args.preset:
        hf = checkpoint(preset, with_tokenizer=True)  # the converter reads the tokenizer files
        for precision in args.precision:
            path = gguf(hf, precision, script)
            cases, sizes = {"llamacpp": LlamaSteps(path, args.context, args.steps, args.rounds, args.threads)}, {}
            sizes["llamacpp"] = path.stat().st_size  # its tensors, plus a few MB of header and vocabulary
            for decode_linear in args.decode_linear:
                model = load(hf, dtype=DTYPES[precision], decode_linear=decode_linear).model
                cases[decode_linear] = DecodeSteps(model, 1, mid, args.steps)
                sizes[decode_linear] = weight_bytes_per_token(model)
            results = interleaved(cases, args.rounds, probe)
            theirs = results.pop("llamacpp")
            for decode_linear, ours in results.items():
                print(json.dumps({
                    "bench": "llamacpp", "preset": preset, "precision": precision, "decode_linear": decode_linear,
                    "context": mid, "threads": args.threads, "rounds": args.rounds, "steps": args.steps,
                    "ours_ms": round(ours["s"] * 1e3, 2), "llamacpp_ms": round(theirs["s"] * 1e3, 2),
                    "ratio_ours_vs_llamacpp": round(statistics.median(
                        t / o for t, o in zip(theirs["seconds"], ours["seconds"])), 3),
                    "read_gb_s": round(ours["probe_bytes_per_s"] / 1e9, 1),
                    "ours_roofline": round(roofline_fraction(sizes[decode_linear], ours["seconds"], ours["probes"]), 3),
                    "llamacpp_roofline": round(roofline_fraction(sizes["llamacpp"], theirs["seconds"],
                                                                 theirs["probes"]), 3),
                    "ours_weight_bytes": sizes[decode_linear], "llamacpp_model_bytes": sizes["llamacpp"]}), flush=True)
            del cases, results


if __name__ == "__main__":
    main()
