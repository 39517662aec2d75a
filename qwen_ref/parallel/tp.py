"""Tensor parallelism over torch.distributed, Megatron-style: each of N ranks holds 1/N of every layer.

    q/k/v_proj, gate/up_proj    column-parallel: each rank its slice of the output rows (its heads)
    o_proj, down_proj           row-parallel: each rank its slice of the input columns; one all-reduce each
    lm_head                     vocabulary-parallel: each rank 1/N of the vocabulary; the logits are gathered
    embeddings, norms           replicated

A rank is the ordinary model (models/qwen2.py, unchanged) built with its local sizes: H/N query heads, KV/N key
and value heads, I/N intermediate, V/N vocabulary rows in lm_head. Forward hooks all-reduce the attention and MLP
outputs (their row-parallel partial sums), and `logits` gathers the vocabulary, so every rank ends a forward
with the full logits. Its KV cache holds its own heads only: 1/N of the memory.

Numerics: a row-parallel product is N partial sums over 1/N of the inputs each, added by the all-reduce, where
one rank sums all the inputs in one BLAS call. The additions happen in another order, so TP logits equal one
rank's to float rounding, not bit for bit (float32 within 1e-5, float64 within 1e-12; tests/test_tensor_parallel.py).

Each rank reads only its slices from the safetensors files, straight into its tensors: no full tensor is built.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from qwen_ref.checkpoint.weights import (
    SAFETENSORS_DTYPES,
    TensorEntry,
    check_names_and_shapes,
    index_checkpoint,
    read_tensor,
)
from qwen_ref.config import QwenConfig
from qwen_ref.errors import CheckpointError
from qwen_ref.models.qwen2 import Pass, QwenForCausalLM

COLUMN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROW = ("self_attn.o_proj", "mlp.down_proj")


class TensorParallelError(CheckpointError):
    """A model that cannot be split over this many ranks, or a process group that does not fit."""


def check_splits(config: QwenConfig, world: int) -> None:
    """Every split size must divide evenly: say which does not."""
    if world < 1:
        raise TensorParallelError(f"tp: {world} ranks; at least 1")
    sizes = {"num_key_value_heads": config.num_key_value_heads, "num_attention_heads": config.num_attention_heads,
             "intermediate_size": config.intermediate_size, "vocab_size": config.vocab_size}
    bad = [f"{name} = {n}" for name, n in sizes.items() if n % world]
    if bad:
        raise TensorParallelError(f"tp: {world} ranks must divide {', '.join(bad)}; this model splits over "
                                  f"{', '.join(map(str, _divisors(config)))} ranks")


def _divisors(config: QwenConfig) -> list[int]:
    g = math.gcd(config.num_key_value_heads, config.num_attention_heads, config.intermediate_size,
                 config.vocab_size)
    return [d for d in range(1, g + 1) if g % d == 0]


def local_config(config: QwenConfig, world: int) -> QwenConfig:
    check_splits(config, world)
    return replace(config, num_attention_heads=config.num_attention_heads // world,
                   num_key_value_heads=config.num_key_value_heads // world,
                   intermediate_size=config.intermediate_size // world, tie_word_embeddings=False)


def _split(name: str) -> int | None:
    """The dimension this rank slices a parameter along (0: output rows, 1: input columns), or None: whole."""
    module = name.rsplit(".", 1)[0]
    if any(module.endswith(m) for m in COLUMN):
        return 0
    if any(module.endswith(m) for m in ROW):
        return 1
    if name == "lm_head.weight":
        return 0
    return None


def read_slice(entry: TensorEntry, dim: int | None, rank: int, world: int) -> torch.Tensor:
    """This rank's 1/world of a tensor along `dim` (all of it for None), read straight from the file into the
    result: no full tensor is built, and nothing else is mapped or buffered (peak memory is the slice)."""
    if dim is None:
        with entry.file.open("rb") as handle:
            return read_tensor(entry, handle)
    dtype = SAFETENSORS_DTYPES[entry.dtype]
    shape = list(entry.shape)
    size = shape[dim] // world
    shape[dim] = size
    out = torch.empty(shape, dtype=dtype)
    buffer = out.view(-1).view(torch.uint8).numpy()
    itemsize = dtype.itemsize
    with entry.file.open("rb") as handle:
        if dim == 0:  # whole rows: one contiguous range
            row = math.prod(entry.shape[1:]) * itemsize
            handle.seek(entry.start + rank * size * row)
            _read_into(handle, buffer, entry)
        else:  # a 2-D tensor's columns: a piece of every row
            assert dim == 1 and len(shape) == 2, (entry.shape, dim)
            row, piece = entry.shape[1] * itemsize, size * itemsize
            for r in range(shape[0]):
                handle.seek(entry.start + r * row + rank * piece)
                _read_into(handle, buffer[r * piece : (r + 1) * piece], entry)
    return out


def _read_into(handle: Any, buffer: np.ndarray, entry: TensorEntry) -> None:
    if handle.readinto(buffer) != buffer.nbytes:
        raise CheckpointError(f"{entry.file}: truncated while reading a tensor at byte {entry.start}")


class _TensorParallelForCausalLM(QwenForCausalLM):
    group: Any

    def logits(self, p: Pass, hidden: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        local = super().logits(p, hidden, last_only).contiguous()  # [B, T, V / world]
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts, dim=-1)  # [B, T, V]


def _all_reduce_output(group: Any) -> Any:
    def hook(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(out, group=group)  # the row-parallel partial sums of o_proj or down_proj
        return out

    return hook


def load_tensor_parallel(directory: Path, config: QwenConfig, *, dtype: torch.dtype, rank: int, world: int,
                         group: Any = None, device: torch.device | str = "cpu") -> QwenForCausalLM:
    """This rank's part of the model in `directory` (a process group of `world` ranks must be initialized). Its
    `config` is the local one (its heads, its intermediate size: what its KV cache and memory budget need); the
    logits it returns are the whole vocabulary's."""
    entries = index_checkpoint(directory)
    local = local_config(config, world)
    with torch.device("meta"):
        full = QwenForCausalLM(config)
    check_names_and_shapes(full, entries, config.tie_word_embeddings, directory)
    with torch.device("meta"):
        model = QwenForCausalLM(local)
    for name, _ in model.named_parameters():
        source = "model.embed_tokens.weight" if name == "lm_head.weight" and config.tie_word_embeddings else name
        tensor = read_slice(entries[source], _split(name), rank, world)
        module_name, _, param = name.rpartition(".")
        # numerics: stored dtype -> compute dtype is one rounding, as in the one-rank load
        model.get_submodule(module_name)._parameters[param] = nn.Parameter(tensor.to(device=device, dtype=dtype),
                                                                            requires_grad=False)
    model.__class__ = _TensorParallelForCausalLM
    model.group = group
    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(_all_reduce_output(group))
        layer.mlp.register_forward_hook(_all_reduce_output(group))
    model.eval()
    return model
