"""LoRA merge/unmerge time: qwen_ref.lora against PEFT's merge_and_unload, on the Qwen2.5-0.5B shapes.

    python benchmarks/bench_lora_merge.py                       # rank 32 on every linear layer, bf16, CPU
    python benchmarks/bench_lora_merge.py --device cuda --repeats 10
    python benchmarks/bench_lora_merge.py --no-peft             # ours only

The checkpoint is the random-weight tiny preset "qwen2.5-0.5b-shape" (the real shapes: 24 layers, hidden 896,
intermediate 4864, GQA 14:2, tied vocab 151936). The adapter is written by this script in PEFT's format (random A
and B, all-linear, i.e. 168 modules). Prints one JSON line per measured operation, then one with the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from qwen_ref.checkpoint.tiny import cached_tiny_checkpoint
from qwen_ref.checkpoint.weights import load_weights
from qwen_ref.config import QwenConfig
from qwen_ref.lora import KEY_PREFIX, OUTPUT_LAYER, LoraAdapter, merge, unmerge


def write_random_adapter(model: nn.Module, out: Path, rank: int, alpha: float, seed: int = 0) -> int:
    """A PEFT-format all-linear adapter with random A and B in bf16. Returns the number of adapted modules."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.split(".")[-1] != OUTPUT_LAYER:
            a = torch.randn(rank, module.in_features, generator=g) / module.in_features**0.5
            b = torch.randn(module.out_features, rank, generator=g) * 0.01
            tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = a.to(torch.bfloat16)
            tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = b.to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
              "target_modules": "all-linear", "bias": "none", "lora_dropout": 0.0, "base_model_name_or_path": None}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return len(tensors) // 2


def timed(fn: Callable[[], object], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def summary(impl: str, op: str, times: list[float], **common) -> dict:
    return {"bench": "lora_merge", "impl": impl, "op": op, **common, "repeats": len(times),
            "median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4),
            "max_s": round(max(times), 4)}


def bench_ours(ckpt: Path, adapter_dir: Path, dtype: torch.dtype, device: str, repeats: int, common: dict):
    model = load_weights(ckpt, QwenConfig.from_file(ckpt / "config.json"), dtype=dtype, device=device)
    load = [timed(lambda: LoraAdapter.from_dir(adapter_dir), device) for _ in range(repeats)]
    adapter = LoraAdapter.from_dir(adapter_dir)
    merges, unmerges = [], []
    for _ in range(repeats + 1):  # the first round warms up
        merges.append(timed(lambda: merge(model, adapter), device))
        unmerges.append(timed(lambda: unmerge(model), device))
    yield summary("qwen_ref", "load_adapter", load, **common)
    yield summary("qwen_ref", "merge", merges[1:], **common)
    yield summary("qwen_ref", "unmerge", unmerges[1:], **common)


def bench_peft(ckpt: Path, adapter_dir: Path, dtype: torch.dtype, device: str, repeats: int, common: dict):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def fresh():
        base = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).to(device)
        return PeftModel.from_pretrained(base, adapter_dir).eval()

    unloads = []
    for _ in range(repeats + 1):
        peft_model = fresh()
        unloads.append(timed(peft_model.merge_and_unload, device))
        del peft_model
    peft_model = fresh()
    merges, unmerges = [], []
    for _ in range(repeats + 1):
        merges.append(timed(peft_model.merge_adapter, device))
        unmerges.append(timed(peft_model.unmerge_adapter, device))  # subtracts: not bit-exact in bf16
    yield summary("peft", "merge_and_unload", unloads[1:], **common)
    yield summary("peft", "merge_adapter", merges[1:], **common)
    yield summary("peft", "unmerge_adapter", unmerges[1:], **common)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen2.5-0.5b-shape")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--alpha", type=float, default=64.0)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-peft", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    ckpt = cached_tiny_checkpoint(args.preset)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dir = Path(tmp) / "adapter"
        with torch.device("meta"):
            from qwen_ref.models.qwen2 import QwenForCausalLM

            skeleton = QwenForCausalLM(QwenConfig.from_file(ckpt / "config.json"))
        modules = write_random_adapter(skeleton, adapter_dir, args.rank, args.alpha)
        common = {"preset": args.preset, "rank": args.rank, "modules": modules, "dtype": args.dtype,
                  "device": args.device, "threads": torch.get_num_threads()}
        runs = [bench_ours(ckpt, adapter_dir, dtype, args.device, args.repeats, common)]
        if not args.no_peft:
            runs.append(bench_peft(ckpt, adapter_dir, dtype, args.device, args.repeats, common))
        for run in runs:
            for line in run:
                results.append(line)
                print(json.dumps(line), flush=True)
    by_op = {(r["impl"], r["op"]): r["median_s"] for r in results}
    if ("peft", "merge_and_unload") in by_op:
        ours = by_op["qwen_ref", "merge"]
        print(json.dumps({"bench": "lora_merge", "op": "ratio", **common,
                          "peft_merge_and_unload_over_ours_merge": round(by_op["peft", "merge_and_unload"] / ours, 3),
                          "peft_merge_adapter_over_ours_merge": round(by_op["peft", "merge_adapter"] / ours, 3)}),
              flush=True)


if __name__ == "__main__":
    main()
