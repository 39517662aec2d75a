"""LoRA time: merge/unmerge against PEFT's merge_and_unload, and per-row unmerged decode steps, on the Qwen2.5-0.5B
shapes.

    python benchmarks/bench_lora_merge.py                       # rank 32 on every linear layer, bf16, CPU
    python benchmarks/bench_lora_merge.py --device cuda --repeats 10
    python benchmarks/bench_lora_merge.py --no-peft             # ours only

The checkpoint is the random-weight tiny preset "qwen2.5-0.5b-shape" (the real shapes: 24 layers, hidden 896,
intermediate 4864, GQA 14:2, tied vocab 151936). The adapters are written by this script in PEFT's format (random A
and B, all-linear, i.e. 168 modules). Prints one JSON line per measured operation, then one with the ratios.

Per-row (RowAdapters): one decode-shaped forward ([batch, 1] tokens) with no adapter, with one adapter on every
row, with two adapters on alternate rows, and with per_row=True; the overhead per adapted linear call is
(time - time without adapters) / 168. PEFT's unmerged forward over transformers' on the same input is the peer.
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
from qwen_ref.lora import KEY_PREFIX, OUTPUT_LAYER, LoraAdapter, RowAdapters, merge, unmerge


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
            "median_s": round(statistics.median(times), 6), "min_s": round(min(times), 6),
            "max_s": round(max(times), 6)}


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


def bench_rows(ckpt: Path, adapter_dirs: list[Path], dtype: torch.dtype, device: str, repeats: int, batch: int,
               common: dict):
    model = load_weights(ckpt, QwenConfig.from_file(ckpt / "config.json"), dtype=dtype, device=device)
    a, b = (LoraAdapter.from_dir(d) for d in adapter_dirs)
    ids = torch.arange(1, batch + 1, device=device)[:, None] * 101  # [batch, 1]: a decode step's shape
    cases = {"none": None, "one_adapter": ([a] * batch, False), "two_alternating": ([a, b] * batch, False),
             "per_row": ([a, b] * batch, True)}
    first = timed(lambda: RowAdapters(model, [a]), device)  # prepares a's branches: once per (adapter, model)
    yield summary("qwen_ref", "rows_prepare_adapter", [first], **common, batch=batch)

    def step(spec):
        lora = None if spec is None else RowAdapters(model, spec[0][:batch], per_row=spec[1])
        return model(ids, lora=lora)

    times: dict[str, list[float]] = {name: [] for name in cases}
    with torch.inference_mode():
        for i in range(2 + 3 * repeats):  # rounds interleave the cases, so drifting machine load hits all alike
            for name, spec in cases.items():
                t = timed(lambda spec=spec: step(spec), device)
                if i >= 2:  # two rounds warm up
                    times[name].append(t)
    for name, ts in times.items():
        yield summary("qwen_ref", f"rows_forward_{name}", ts, **common, batch=batch)


def bench_peft_unmerged(ckpt: Path, adapter_dir: Path, dtype: torch.dtype, device: str, repeats: int, batch: int,
                        common: dict):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).to(device).eval()
    ids = torch.arange(1, batch + 1, device=device)[:, None] * 101
    wrapped = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype), adapter_dir)
    wrapped = wrapped.to(device).eval()
    plain, unmerged = [], []
    with torch.inference_mode():
        for i in range(2 + 3 * repeats):
            t_plain, t_unmerged = timed(lambda: base(ids), device), timed(lambda: wrapped(ids), device)
            if i >= 2:
                plain.append(t_plain)
                unmerged.append(t_unmerged)
    yield summary("transformers", "rows_forward_none", plain, **common, batch=batch)
    yield summary("peft", "rows_forward_one_adapter", unmerged, **common, batch=batch)


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
    parser.add_argument("--batch", type=int, default=8, help="rows of the per-row decode step")
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
        second = Path(tmp) / "second"
        write_random_adapter(skeleton, second, args.rank, args.alpha, seed=1)
        common = {"preset": args.preset, "rank": args.rank, "modules": modules, "dtype": args.dtype,
                  "device": args.device, "threads": torch.get_num_threads()}
        runs = [bench_ours(ckpt, adapter_dir, dtype, args.device, args.repeats, common),
                bench_rows(ckpt, [adapter_dir, second], dtype, args.device, args.repeats, args.batch, common)]
        if not args.no_peft:
            runs.append(bench_peft(ckpt, adapter_dir, dtype, args.device, args.repeats, common))
            runs.append(bench_peft_unmerged(ckpt, adapter_dir, dtype, args.device, args.repeats, args.batch, common))
        for run in runs:
            for line in run:
                results.append(line)
                print(json.dumps(line), flush=True)
    by_op = {(r["impl"], r["op"]): r["median_s"] for r in results}
    fastest = {(r["impl"], r["op"]): r["min_s"] for r in results}
    base = by_op["qwen_ref", "rows_forward_none"]
    # a small difference of two forwards: from the least disturbed runs (min), which a busy machine spoils least
    per_call = {f"{name}_overhead_per_apply_us": round(
                (fastest["qwen_ref", f"rows_forward_{name}"] - fastest["qwen_ref", "rows_forward_none"]) / modules
                * 1e6, 1) for name in ("one_adapter", "two_alternating", "per_row")}
    ratios = {"ours_one_adapter_over_no_adapter": round(by_op["qwen_ref", "rows_forward_one_adapter"] / base, 3)}
    if ("peft", "rows_forward_one_adapter") in by_op:
        ratios["peft_unmerged_over_transformers"] = round(
            by_op["peft", "rows_forward_one_adapter"] / by_op["transformers", "rows_forward_none"], 3)
    print(json.dumps({"bench": "lora_rows", "op": "ratio", **common, "batch": args.batch, **per_call, **ratios}),
          flush=True)
    if ("peft", "merge_and_unload") in by_op:
        ours = by_op["qwen_ref", "merge"]
        print(json.dumps({"bench": "lora_merge", "op": "ratio", **common,
                          "peft_merge_and_unload_over_ours_merge": round(by_op["peft", "merge_and_unload"] / ours, 3),
                          "peft_merge_adapter_over_ours_merge": round(by_op["peft", "merge_adapter"] / ours, 3)}),
              flush=True)


if __name__ == "__main__":
    main()
