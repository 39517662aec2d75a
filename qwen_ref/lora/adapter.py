"""An adapter directory: adapter_config.json and adapter_model.safetensors, read whole and checked.

Pickle weights are never read. Every tensor is read into CPU memory, checked for NaN and inf, and sorted by
key into LoRA tensors (per module) and replacements (base parameters PEFT saved whole).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from qwen_ref.checkpoint.weights import read_safetensors_header, read_tensor
from qwen_ref.errors import CheckpointError
from qwen_ref.json_files import read_json_file
from qwen_ref.lora.config import ADAPTER_CONFIG, AdapterConfig, LoraError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
KEY_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the HF model, whose module names follow

_LORA_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_B.bias": "B_bias",
    ".lora_embedding_A": "emb_A",
    ".lora_embedding_B": "emb_B",
    ".lora_magnitude_vector.weight": "magnitude",
    ".lora_magnitude_vector": "magnitude",
}


@dataclass
class LoraAdapter:
    name: str
    path: Path
    config: AdapterConfig
    lora: dict[str, dict[str, torch.Tensor]]  # module name -> {"A", "B", "B_bias", "emb_A", "emb_B", "magnitude"}
    replacements: dict[str, torch.Tensor]  # parameter name -> tensor that replaces it (biases, modules_to_save, ...)

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str], name: str | None = None) -> LoraAdapter:
        directory = Path(path)
        if not directory.is_dir():
            raise LoraError(f"adapter {os.fspath(path)!r}: not a directory")
        cfg_path, weights = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
        if not cfg_path.is_file():
            raise LoraError(f"adapter {directory}: no {ADAPTER_CONFIG}")
        if not weights.is_file():
            pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise LoraError(f"adapter {directory}: only pickle weights ({', '.join(pickles)}); pickle files are "
                                f"never loaded. Save the adapter as {ADAPTER_WEIGHTS} (PEFT save_pretrained with "
                                "safe_serialization=True)")
            raise LoraError(f"adapter {directory}: no {ADAPTER_WEIGHTS}")
        raw = read_json_file(cfg_path, LoraError)
        config = AdapterConfig.from_dict(raw, str(cfg_path))
        lora, replacements = _split_keys(_read_all(weights), weights)
        return cls(name or directory.name, directory, config, lora, replacements)

    def __repr__(self) -> str:
        return f"LoraAdapter(name={self.name!r}, path={str(self.path)!r}, modules={len(self.lora)})"


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    try:
        entries = read_safetensors_header(path)
        with path.open("rb") as handle:
            tensors = {name: read_tensor(entry, handle) for name, entry in entries.items()}
    except CheckpointError as e:
        raise LoraError(f"adapter weights: {e}") from None
    for name, t in tensors.items():
        # amax propagates NaN and inf; on CPU it is much faster than isfinite(t).all() for bf16
        if t.numel() and not bool(torch.isfinite(t.float().abs().amax())):
            raise LoraError(f"{path}: tensor {name!r} holds NaN or infinite values")
    return tensors


def _split_keys(tensors: dict[str, torch.Tensor], path: Path):
    lora: dict[str, dict[str, torch.Tensor]] = {}
    replacements: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if not key.startswith(KEY_PREFIX):
            raise LoraError(f"{path}: tensor {key!r} does not start with {KEY_PREFIX!r}; not a PEFT causal-LM adapter")
        key = key[len(KEY_PREFIX):]
        suffix = next((s for s in _LORA_SUFFIXES if key.endswith(s)), None)
        if suffix is not None:
            lora.setdefault(key[: -len(suffix)], {})[_LORA_SUFFIXES[suffix]] = t
        elif ".lora_" in key or key.startswith("lora_"):
            raise LoraError(f"{path}: tensor {key!r} is not a LoRA tensor this merge knows (only lora_A/lora_B, "
                            "lora_embedding_A/B and lora_magnitude_vector; was it saved with an adapter name?)")
        else:
            # a base-model parameter saved whole: bias="all"/"lora_only", modules_to_save, saved embeddings
            replacements[key.replace(".base_layer.", ".")] = t
    return lora, replacements
