"""qwen_ref.load(source): resolve a source to a local checkpoint directory and load model + tokenizer."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import models
from .config import QwenConfig
from .errors import CheckpointError, SourceNotFoundError
from .model import QwenForCausalLM
from .weights import load_weights, parse_dtype

# What a hub download fetches: configs, weights, tokenizer. Never pickle files.
HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
]
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class Qwen:
    model: QwenForCausalLM
    tokenizer: Any  # qwen_ref.tokenizer.QwenTokenizer, or None when the checkpoint has no tokenizer files
    config: QwenConfig
    path: Path
    generation_config: dict[str, Any] = field(default_factory=dict)
    known: models.KnownModel | None = None
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


def resolve_source(source: str | os.PathLike[str]) -> tuple[Path, models.KnownModel | None]:
    """A local directory for source: "tiny[:PRESET]", a directory, a Workers AI id or a hub repo id."""
    text = os.fspath(source)
    if text == "tiny" or text.startswith("tiny:"):
        from .tiny import DEFAULT_PRESET, PRESETS, cached_tiny_checkpoint

        preset = text.partition(":")[2] or DEFAULT_PRESET
        if preset not in PRESETS:
            raise SourceNotFoundError(f"source: {text!r}: unknown tiny preset; allowed: "
                                      + ", ".join(f"tiny:{p}" for p in PRESETS))
        return cached_tiny_checkpoint(preset), None
    path = Path(text).expanduser()
    if path.is_dir():
        return path, None
    if path.exists():
        raise SourceNotFoundError(f"source: {text!r} is a file; pass the checkpoint directory that contains it")
    known = None
    if text.startswith("@cf/"):
        known = models.lookup(text)
        if known is None:
            raise SourceNotFoundError(
                f"source: {text!r} is not a known Workers AI model; allowed: {', '.join(models.KNOWN_MODELS)}"
            )
        text = known.hf_repo
    if not _REPO_ID.match(text):
        raise SourceNotFoundError(
            f"source: {text!r} is neither a directory, 'tiny', a Workers AI id (@cf/qwen/...) nor a hub repo id "
            "(org/name)"
        )
    return _download(text), known


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=offline))
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as e:
        raise SourceNotFoundError(f"source: hub repo {repo_id!r} cannot be fetched ({type(e).__name__}); "
                                  "check the name and your HF token (huggingface-cli login)") from None
    except LocalEntryNotFoundError:
        raise SourceNotFoundError(
            f"source: {repo_id!r} is not in the local Hugging Face cache and the hub cannot be reached"
            f"{' (HF_HUB_OFFLINE is set)' if offline else ''}; download it where there is network "
            f"(huggingface-cli download {repo_id}) or pass a local checkpoint directory"
        ) from None
    except OSError as e:  # connection errors are OSErrors in requests/httpx
        raise SourceNotFoundError(f"source: {repo_id!r}: hub download failed ({e}); pass a local directory or "
                                  "retry with network") from None
    if not (path / "config.json").is_file():
        raise SourceNotFoundError(f"source: {repo_id!r}: the cached snapshot {path} has no config.json "
                                  "(an incomplete earlier download?); download it again with network")
    return path


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
    from .tokenizer import load_tokenizer

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
        from .lora import AdapterRegistry, merge, resolve_adapter

        registry = AdapterRegistry(lora_dir) if lora_dir is not None else None
        if lora is not None:
            default = resolve_adapter(os.fspath(lora), registry)
            merge(model, default)
    return Qwen(model, tokenizer, config, path, generation, known, registry, default)
