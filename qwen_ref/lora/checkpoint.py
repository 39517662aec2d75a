"""A merged HF checkpoint on disk (`qwen-ref merge-lora`): source + adapter, which transformers loads."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from qwen_ref.checkpoint.sources import resolve_source
from qwen_ref.checkpoint.weights import load_weights, parse_dtype
from qwen_ref.config import QwenConfig
from qwen_ref.lora.adapter import LoraAdapter
from qwen_ref.lora.config import LoraError
from qwen_ref.lora.merge import merge
from qwen_ref.lora.registry import resolve_adapter

_WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|pkl|pickle|h5|msgpack|gguf)|.*\.safetensors\.index\.json")


def write_merged_checkpoint(source: str | os.PathLike[str], adapter: LoraAdapter | str | os.PathLike[str],
                            out_dir: str | os.PathLike[str]) -> Path:
    """Write source + adapter merged as an HF checkpoint (single model.safetensors) that transformers loads.

    Weights stay in the source's dtype. A tied model whose adapter makes lm_head differ from embed_tokens is
    written untied (both tensors, tie_word_embeddings false).
    """
    src, _ = resolve_source(source)
    adapter = resolve_adapter(adapter)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LoraError(f"--out {out}: exists and is not an empty directory")
    config = QwenConfig.from_file(src / "config.json")
    model = load_weights(src, config, dtype=parse_dtype(None, config))
    merge(model, adapter)

    tensors = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters()}
    raw_config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    if config.tie_word_embeddings and head is not embed:
        if torch.equal(head, embed):
            tensors.pop("lm_head.weight", None)
        else:
            raw_config["tie_word_embeddings"] = False

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        for f in sorted(src.iterdir()):
            if f.is_file() and f.name != "config.json" and not _WEIGHT_FILE.fullmatch(f.name):
                shutil.copyfile(f, tmp / f.name)
        (tmp / "config.json").write_text(json.dumps(raw_config, indent=2) + "\n", encoding="utf-8")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "merged_lora": adapter.name})
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
