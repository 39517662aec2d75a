"""Tensor parallelism over torch.distributed, Megatron-style: each of N ranks holds 1/N of every layer.

    q/k/v_proj, gate/up_proj    column-parallel: each rank its slice of the output rows (its heads)
    o_proj, down_proj           row-parallel: each rank its slice of the input columns; one all-reduce each
    lm_head                     vocabulary-parallel: each rank 1/N of the vocabulary; the logits are gathered
    embed_tokens                vocabulary-parallel: each rank 1/N of the rows; the looked-up rows are summed
    norms                       replicated

A rank is the ordinary model (models/qwen2.py, unchanged) built with its local sizes: H/N query heads, KV/N key
and value heads, I/N intermediate, V/N vocabulary rows in lm_head and embed_tokens (one tensor when tied). Its
linear backend all-reduces the outputs of o_proj and down_proj (their row-parallel partial sums), and `logits`
gathers the vocabulary, so every rank ends a forward with the full logits. Its KV cache holds its own heads
only: 1/N of the memory.

Numerics: a row-parallel product is N partial sums over 1/N of the inputs each, added by the all-reduce, where
one rank reduces all the inputs inside one BLAS call. The additions happen in another order, so TP logits equal
one rank's to float rounding, not bit for bit (float32 within 1e-5, float64 within 1e-12;
tests/test_tensor_parallel.py). No order of adding the N partial sums can reproduce the inside of a BLAS call.

exact=True (for oracle use) makes TP equal one rank bit for bit: every rank keeps the same 1/N of the weights, but
before each decoder layer runs its weights are all-gathered, the layer runs whole (all heads, the whole MLP) as on
one rank, and they are released after it; lm_head likewise. Every op then has the one-rank shapes, so it rounds as
one rank does. The cost: every rank computes the whole model (no speed-up), the whole layer's weights move to
every rank on every forward, one layer's full weights are resident at a time, and the KV cache holds all the heads
(benchmarks/bench_tp.py measures it). Splitting the products by output columns instead (gathering activations,
not weights) is cheaper but not exact: a BLAS may pick another kernel for 1/N of the columns, and does on this
CPU for float32 at small widths and for float64.

Each rank reads only its slices from the safetensors files, straight into its tensors: no full tensor is built.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
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
from qwen_ref.models.backends import resolve_backends
from qwen_ref.models.qwen2 import Pass, QwenForCausalLM

COLUMN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROW = ("self_attn.o_proj", "mlp.down_proj")


class TensorParallelError(CheckpointError):
    """A model that cannot be split over this many ranks, or a process group that does not fit."""


def check_splits(config: QwenConfig, world: int) -> None:
    """Every split size must divide evenly: say which does not."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise TensorParallelError(f"tp: {world!r} ranks; an integer >= 1")
    sizes = {"num_key_value_heads": config.num_key_value_heads, "num_attention_heads": config.num_attention_heads,
             "intermediate_size": config.intermediate_size, "vocab_size": config.vocab_size}
    bad = [f"{name} = {n}" for name, n in sizes.items() if n % world]
    if bad:
        g = math.gcd(*sizes.values())
        works = [d for d in range(1, g + 1) if g % d == 0]
        raise TensorParallelError(f"tp: {world} ranks must divide {', '.join(bad)}; this model splits over "
                                  f"{', '.join(map(str, works))} ranks")


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
    if name in ("lm_head.weight", "model.embed_tokens.weight"):
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


def gather(t: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    """Every rank's t, concatenated along `dim` in rank order."""
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t, group=group)
    return torch.cat(parts, dim=dim)


Linear = Callable[[torch.Tensor, Sequence[nn.Linear]], list[torch.Tensor]]


def all_reduce_row_parallel(inner: Linear, group: Any) -> Linear:
    """The backend's linear, with the partial sums of o_proj and down_proj (marked tp_row) added across ranks."""

    def linear(x: torch.Tensor, layers: Sequence[nn.Linear]) -> list[torch.Tensor]:
        ys = inner(x, layers)
        if getattr(layers[0], "tp_row", False):
            assert len(layers) == 1 and layers[0].bias is None, "row-parallel layers run alone and have no bias"
            dist.all_reduce(ys[0], group=group)  # each rank's partial sum over its 1/N of the inputs
        return ys

    return linear


class _TensorParallelForCausalLM(QwenForCausalLM):
    group: Any

    def logits(self, p: Pass, hidden: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        local = super().logits(p, hidden, last_only)  # [B, T, V / world]
        return gather(local, -1, self.group)  # [B, T, V]


class VocabParallelEmbedding(nn.Embedding):
    """Rows [start, start + V/N) of the embedding. An id this rank does not hold looks up -0.0, and the all-reduce
    adds the one real row to the others' -0.0: v + (-0.0) is v for every v (+0.0 and -0.0 too), so the rows are
    one rank's bit for bit."""

    start: int
    vocab_size: int
    group: Any

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise IndexError(f"token id out of range 0..{self.vocab_size - 1}")  # as nn.Embedding, on every rank
        local = ids - self.start
        held = (local >= 0) & (local < self.weight.shape[0])
        rows = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)  # [B, T, hidden]
        rows = rows.masked_fill(~held[..., None], -0.0)
        dist.all_reduce(rows, group=self.group)
        return rows


class WholeWeights:
    """exact=True: a module's sharded parameters all-gathered whole just before it computes, the shards put back
    just after."""

    def __init__(self, group: Any):
        self.group = group
        self.shards: dict[nn.Module, dict[str, tuple[nn.Parameter, int]]] = {}

    def add(self, module: nn.Module, param: str, shard: nn.Parameter, dim: int) -> None:
        self.shards.setdefault(module, {})[param] = (shard, dim)

    def gather(self, owner: nn.Module) -> None:
        for module, params in self._within(owner):
            for param, (shard, dim) in params.items():
                module._parameters[param] = nn.Parameter(gather(shard, dim, self.group), requires_grad=False)

    def release(self, owner: nn.Module) -> None:
        for module, params in self._within(owner):
            for param, (shard, _) in params.items():
                module._parameters[param] = shard

    def _within(self, owner: nn.Module) -> list[tuple[nn.Module, dict[str, tuple[nn.Parameter, int]]]]:
        inside = set(owner.modules())
        return [(m, params) for m, params in self.shards.items() if m in inside]


class _ExactTensorParallelForCausalLM(QwenForCausalLM):
    whole: WholeWeights

    def logits(self, p: Pass, hidden: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        self.whole.gather(self.lm_head)
        try:
            return super().logits(p, hidden, last_only)  # [B, T, V]: one rank's lm_head product
        finally:
            self.whole.release(self.lm_head)


def load_tensor_parallel(directory: Path, config: QwenConfig, *, dtype: torch.dtype, rank: int, world: int,
                         group: Any = None, device: torch.device | str = "cpu", exact: bool = False,
                         kernels: str = "torch") -> QwenForCausalLM:
    """This rank's part of the model in `directory` (a process group of `world` ranks must be initialized). Its
    `config` is the one its KV cache and memory budget need: the local one (its heads, its intermediate size), or
    with exact=True the whole one; the logits it returns are the whole vocabulary's. kernels: as load()'s."""
    entries = index_checkpoint(directory)
    local = local_config(config, world)
    with torch.device("meta"):
        full = QwenForCausalLM(config)
    check_names_and_shapes(full, entries, config.tie_word_embeddings, directory)
    with torch.device("meta"):
        model = QwenForCausalLM(replace(config, tie_word_embeddings=False) if exact else local)
    whole = WholeWeights(group)
    for name, _ in model.named_parameters():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # embed_tokens' rows, below
        dim = _split(name)
        tensor = read_slice(entries[name], dim, rank, world)
        module_name, _, param = name.rpartition(".")
        module = model.get_submodule(module_name)
        # numerics: stored dtype -> compute dtype is one rounding, as in the one-rank load
        module._parameters[param] = nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False)
        if exact and dim is not None and module is not model.model.embed_tokens:
            whole.add(module, param, module._parameters[param], dim)
    if config.tie_word_embeddings:  # one tensor, as on one rank: the rows this rank holds of both
        model.lm_head._parameters["weight"] = model.model.embed_tokens.weight
        if exact:
            whole.add(model.lm_head, "weight", model.lm_head.weight, 0)
    embed = model.model.embed_tokens
    embed.__class__ = VocabParallelEmbedding
    embed.start, embed.vocab_size, embed.group = rank * config.vocab_size // world, config.vocab_size, group
    backends = resolve_backends(model, kernels=kernels, decode_linear="torch")
    if exact:
        model.__class__ = _ExactTensorParallelForCausalLM
        model.whole = whole
        for layer in model.model.layers:
            layer.register_forward_pre_hook(lambda module, args: whole.gather(module))
            layer.register_forward_hook(lambda module, args, out: whole.release(module))
        model.backends = backends
    else:
        model.__class__ = _TensorParallelForCausalLM
        for layer in model.model.layers:
            layer.self_attn.o_proj.tp_row = True
            layer.mlp.down_proj.tp_row = True
        model.backends = replace(backends, name=f"{backends.name}+tp", linear=all_reduce_row_parallel(
            backends.linear, group))
    model.group = group
    model.eval()
    return model
