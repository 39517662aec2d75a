"""Layer streaming (`load(..., offload="disk")`): a model larger than memory, run from its safetensors files.

The embeddings, the final norm and lm_head stay in memory. Each decoder layer's weights are read from the files
just before the layer runs and released right after, so the process holds one layer's weights at a time beside
the embeddings, the KV cache and the activations. The bytes and the dtype conversion are those of the in-memory
load, so the logits are the same bit for bit; every forward reads every layer once (the OS page cache keeps
what memory allows). A prefill or a scored sequence is one pass per chunk; a decode step is one pass per token.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from qwen_ref.checkpoint.weights import read_tensor


class LayerStreamer:
    """Loads each decoder layer's parameters before its forward and releases them after (forward hooks)."""

    def __init__(self, model: nn.Module, entries: dict[str, Any], dtype: torch.dtype, device: torch.device | str):
        self.entries, self.dtype, self.device = entries, dtype, device
        self.files = ExitStack()
        self.handles: dict[Path, BinaryIO] = {}
        self.bytes_read = 0
        self.layers = list(model.model.layers)
        for i, layer in enumerate(self.layers):
            layer.register_forward_pre_hook(lambda module, args, i=i: self.load(i))
            layer.register_forward_hook(lambda module, args, out, i=i: self.release(i))
            self.release(i)

    def _parameters(self, i: int) -> Iterator[tuple[str, nn.Module, str]]:
        for name, _ in self.layers[i].named_parameters():
            module_name, _, param = name.rpartition(".")
            yield f"model.layers.{i}.{name}", self.layers[i].get_submodule(module_name), param

    def load(self, i: int) -> None:
        for full, module, param in self._parameters(i):
            entry = self.entries[full]
            handle = self.handles.get(entry.file)
            if handle is None:
                handle = self.handles[entry.file] = self.files.enter_context(entry.file.open("rb"))
            # numerics: the same read and the same one rounding to the compute dtype as the in-memory load
            tensor = read_tensor(entry, handle).to(device=self.device, dtype=self.dtype)
            module._parameters[param] = nn.Parameter(tensor, requires_grad=False)
            self.bytes_read += entry.end - entry.start

    def release(self, i: int) -> None:
        for _, module, param in self._parameters(i):
            old = module._parameters[param]
            module._parameters[param] = nn.Parameter(torch.empty(old.shape, dtype=self.dtype, device="meta"),
                                                     requires_grad=False)

    def resident_bytes(self, model: nn.Module) -> int:
        return sum(p.nbytes for p in model.parameters() if p.device.type != "meta")

    def close(self) -> None:
        self.files.close()
        self.handles.clear()
