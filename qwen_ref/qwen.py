"""qwen_ref.load(source): resolve a source to a local checkpoint directory and load model + tokenizer."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qwen_ref import known_models
from qwen_ref.allocator import retain_freed_memory
from qwen_ref.checkpoint.sources import resolve_source
from qwen_ref.checkpoint.weights import check_offload, load_weights, parse_dtype
from qwen_ref.config import QwenConfig
from qwen_ref.errors import CheckpointError, ConfigError
from qwen_ref.json_files import read_json_file
from qwen_ref.lora import AdapterRegistry, check_unmerged, merge, resolve_adapter
from qwen_ref.models.backends import check_backend_options, resolve_backends
from qwen_ref.models.qwen2 import QwenForCausalLM
from qwen_ref.tokenizer.runtime import load_tokenizer


@dataclass
class Qwen:
    model: QwenForCausalLM
    tokenizer: Any  # qwen_ref.tokenizer.QwenTokenizer, or None when the checkpoint has no tokenizer files
    config: QwenConfig
    path: Path
    generation_config: dict[str, Any] = field(default_factory=dict)
    known: known_models.KnownModel | None = None
    adapters: Any = None  # qwen_ref.lora.AdapterRegistry: named adapters a request's `lora` selects
    default_adapter: Any = None  # load(lora=...): merged; with lora_dir, applied per row to requests naming none
    ranks: Any = None  # load(tp=N): qwen_ref.parallel.ranks.Ranks, the processes behind the model

    def close(self) -> None:
        """Stop a tensor-parallel model's other ranks now (they also stop when this process exits)."""
        if self.ranks is not None:
            self.ranks.close()

    def __enter__(self) -> Qwen:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Generation stops at these: generation_config's eos ids, else config's, plus the tokenizer's eos."""
        ids = self.generation_config.get("eos_token_id", list(self.config.eos_token_id))
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if self.tokenizer is not None and self.tokenizer.eos_token is not None:
            eos = self.tokenizer.token_to_id(self.tokenizer.eos_token)
            if eos is not None and eos not in ids:
                ids.append(eos)
        return tuple(ids)


def read_generation_config(path: Path, config: QwenConfig, tokenizer: Any) -> dict[str, Any]:
    """generation_config.json, read as carefully as config.json: a JSON object whose eos_token_id is an id or a
    list of ids the model can produce (checked here, not at the first generate())."""
    if not path.is_file():
        return {}
    generation = read_json_file(path, ConfigError)
    eos = generation.get("eos_token_id")
    if eos is None:
        return generation
    ids = [eos] if isinstance(eos, int) and not isinstance(eos, bool) else eos
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ConfigError(f"{path}: eos_token_id: {eos!r:.80} is not an integer or a list of integers")
    limit = config.vocab_size if tokenizer is None else min(config.vocab_size, tokenizer.vocab_size)
    bad = [i for i in ids if not 0 <= i < limit]
    if bad:
        raise ConfigError(f"{path}: eos_token_id: {bad[:5]} outside the vocabulary (0..{limit - 1})")
    return generation


def load(
    source: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    progress: bool = False,
    lora: str | os.PathLike[str] | None = None,
    lora_dir: str | os.PathLike[str] | None = None,
    kernels: str = "torch",
    decode_linear: str = "auto",
    offload: str = "none",
    tp: int = 1,
    tp_exact: bool = False,
) -> Qwen:
    """lora: an adapter directory (or a name in lora_dir) merged into the weights; lora_dir: a directory of
    named adapters that a request's `lora` field selects, applied unmerged to that request's rows (with lora_dir,
    `lora` is the adapter of requests that name none, also applied per row, never merged; see docs/lora.md).
    decode_linear: "auto" (default: "invariant" on the CPU in float32, bfloat16 and float16 where a C++ compiler builds
    the kernel, else "torch"), "torch" (BLAS; decode logits bit-equal to transformers) or "invariant" (the
    batch-invariant CPU kernel: decode at memory speed, n samples in one forward each bit-equal to its single
    run; logits within float32 rounding of transformers; see docs/performance.md).
    offload: "none" (default) or "disk": the decoder layers stay in the safetensors files and each is read in
    just before it runs (checkpoint/offload.py; docs/scale.md): the same logits, a fraction of the memory.
    tp: tensor parallelism over N ranks (parallel/; docs/scale.md): started here, or joined under torchrun, where
    load() returns on rank 0 only. tp_exact: the one-rank arithmetic bit for bit, at the cost of speed.
    The process's glibc malloc is set to reuse the memory it frees (qwen_ref/allocator.py: no page faults for
    each new activation; the peak heap stays with the process)."""
    path, known = resolve_source(source)
    config = QwenConfig.from_file(path / "config.json")
    torch_dtype = parse_dtype(dtype, config)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise CheckpointError(f"device: {device!r} is not a valid torch device ({e})") from None
    check_backend_options(kernels, decode_linear, device, torch_dtype)  # before any weight is read
    check_offload(offload)
    merged_lora = lora is not None and lora_dir is None
    if offload != "none" and (merged_lora or decode_linear == "invariant" or kernels != "torch"):
        raise CheckpointError("offload='disk' streams the weights from the files as they are: it does not combine "
                              "with a merged lora (use lora_dir: adapters apply per row), decode_linear='invariant' "
                              "or Triton kernels")
    parallel = tp != 1 or tp_exact
    if parallel and (lora is not None or lora_dir is not None or offload != "none" or decode_linear == "invariant"):
        raise CheckpointError("tp: a tensor-parallel model does not combine with lora, lora_dir, offload='disk' or "
                              "decode_linear='invariant'")
    tokenizer = load_tokenizer(path)
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"tokenizer knows {tokenizer.vocab_size} ids but the model's vocab_size is {config.vocab_size}"
        )
    generation = read_generation_config(path / "generation_config.json", config, tokenizer)
    retain_freed_memory()
    if parallel:
        from qwen_ref.parallel.ranks import load_model  # torch.distributed loads only for tp

        args = {"source": os.fspath(path), "dtype": str(torch_dtype).removeprefix("torch."), "device": str(device),
                "kernels": kernels, "tp": tp, "tp_exact": tp_exact}
        model, ranks = load_model(path, config, dtype=torch_dtype, device=device, world=tp, exact=tp_exact,
                                  kernels=kernels, load_args=args)
        return Qwen(model, tokenizer, config, path, generation, known, ranks=ranks)
    model = load_weights(path, config, dtype=torch_dtype, device=device, progress=progress, offload=offload)
    if offload != "none":
        decode_linear = "torch"  # "auto": the streamed layers are read as the files hold them
    registry = AdapterRegistry(lora_dir) if lora_dir is not None else None
    default = resolve_adapter(os.fspath(lora), registry) if lora is not None else None
    if default is not None and registry is None:
        merge(model, default)  # the model is base + adapter, merged exactly as PEFT merges
    elif default is not None:
        check_unmerged(model, default)  # with a registry every adapter, the default too, is applied per row
    model.backends = resolve_backends(model, kernels=kernels, decode_linear=decode_linear)
    return Qwen(model, tokenizer, config, path, generation, known, registry, default)
