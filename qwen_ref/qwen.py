"""qwen_ref.load(source): resolve a source to a local checkpoint directory and load model + tokenizer."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qwen_ref import known_models
from qwen_ref.checkpoint.sources import resolve_source
from qwen_ref.checkpoint.weights import load_weights, parse_dtype
from qwen_ref.config import QwenConfig
from qwen_ref.errors import CheckpointError
from qwen_ref.models.qwen2 import QwenForCausalLM


@dataclass
class Qwen:
    model: QwenForCausalLM
    tokenizer: Any  # qwen_ref.tokenizer.QwenTokenizer, or None when the checkpoint has no tokenizer files
    config: QwenConfig
    path: Path
    generation_config: dict[str, Any] = field(default_factory=dict)
    known: known_models.KnownModel | None = None
    adapters: Any = None  # qwen_ref.lora.AdapterRegistry: named adapters a request's `lora` selects
    default_adapter: Any = None  # qwen_ref.lora.LoraAdapter merged at load time, active when a request names none

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


def _use_triton(kernels: str, device: torch.device) -> bool:
    """kernels: "torch" (the default), "triton", or "auto" (triton on CUDA when it is installed)."""
    if kernels not in ("torch", "triton", "auto"):
        raise CheckpointError(f"kernels: {kernels!r} is not supported; allowed: 'torch', 'triton', 'auto'")
    if kernels == "torch":
        return False
    try:
        from qwen_ref_kernels import rms_norm  # noqa: F401  (imports triton)
    except ImportError as e:
        if kernels == "auto":
            return False
        raise CheckpointError(f"kernels='triton' needs triton: pip install 'qwen-ref[kernels]' ({e})") from None
    if kernels == "auto":
        return device.type == "cuda"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise CheckpointError(f"kernels='triton' on {device} needs a CUDA device, or TRITON_INTERPRET=1 set "
                              "before the first import of qwen_ref_kernels (the Triton interpreter, for tests)")
    return True


def _use_invariant(decode_linear: str, device: torch.device, dtype: torch.dtype) -> bool:
    if decode_linear not in ("torch", "invariant"):
        raise CheckpointError(f"decode_linear: {decode_linear!r} is not supported; allowed: 'torch', 'invariant'")
    if decode_linear == "torch":
        return False
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        raise CheckpointError(f"decode_linear='invariant' runs on the CPU in float32 or bfloat16; got device "
                              f"{device}, dtype {dtype}")
    from qwen_ref_kernels.invariant_linear import InvariantLinearUnavailable, extension

    try:
        extension()  # built (or found in the cache) now, so that a missing compiler shows at load time
    except InvariantLinearUnavailable as e:
        raise CheckpointError(f"decode_linear='invariant': {e}") from None
    return True


def load(
    source: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    progress: bool = False,
    lora: str | os.PathLike[str] | None = None,
    lora_dir: str | os.PathLike[str] | None = None,
    kernels: str = "torch",
    decode_linear: str = "torch",
) -> Qwen:
    """lora: an adapter directory (or a name in lora_dir) merged into the weights; lora_dir: a directory of
    named adapters that a request's `lora` field selects (see docs/lora.md).
    decode_linear: "torch" (BLAS; decode logits bit-equal to transformers) or "invariant" (the batch-invariant
    CPU kernel: exact batched decoding at batch speed, and bfloat16 at memory speed; see docs/performance.md)."""
    from qwen_ref.tokenizer.runtime import load_tokenizer

    path, known = resolve_source(source)
    config = QwenConfig.from_file(path / "config.json")
    torch_dtype = parse_dtype(dtype, config)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise CheckpointError(f"device: {device!r} is not a valid torch device ({e})") from None
    use_triton = _use_triton(kernels, device)
    invariant = _use_invariant(decode_linear, device, torch_dtype)
    model = load_weights(path, config, dtype=torch_dtype, device=device, progress=progress)
    model.use_kernels(use_triton)
    model.use_invariant_linear(invariant)
    tokenizer = load_tokenizer(path)
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"tokenizer knows {tokenizer.vocab_size} ids but the model's vocab_size is {config.vocab_size}"
        )
    gen_path = path / "generation_config.json"
    generation = json.loads(gen_path.read_text(encoding="utf-8")) if gen_path.is_file() else {}
    registry = default = None
    if lora_dir is not None or lora is not None:
        from qwen_ref.lora.core import AdapterRegistry, merge, resolve_adapter

        registry = AdapterRegistry(lora_dir) if lora_dir is not None else None
        if lora is not None:
            default = resolve_adapter(os.fspath(lora), registry)
            merge(model, default)
    return Qwen(model, tokenizer, config, path, generation, known, registry, default)
