"""Load HF-format safetensors weights (one file or sharded) into QwenForCausalLM with strict name checks.

The model is built on the meta device and each tensor is read from disk straight into its final place, so
peak memory stays at the size of the weights plus one tensor being converted. Pickle files are never read.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qwen_ref.config import QwenConfig
from qwen_ref.dtypes import DTYPES
from qwen_ref.errors import CheckpointError
from qwen_ref.models.qwen2 import QwenForCausalLM

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER = 100 * 1024 * 1024
# Non-persistent buffers some older exports saved; they carry no information the config does not have.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in file
    end: int


def parse_dtype(dtype: str | torch.dtype | None, config: QwenConfig) -> torch.dtype:
    if dtype is None:
        dtype = config.torch_dtype or "float32"
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise CheckpointError(f"dtype: {dtype} is not supported; allowed: {', '.join(DTYPES)}")
        return dtype
    name = dtype.removeprefix("torch.")
    if name not in DTYPES:
        raise CheckpointError(f"dtype: {dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    return DTYPES[name]


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and validate one safetensors file's header: every tensor must lie inside the file."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors file (header length {n}, "
                                      f"file size {size})")
            header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + n
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {name!r}: {info!r}") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {dtype}; allowed: {', '.join(SAFETENSORS_DTYPES)}"
            )
        nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
        if end - begin != nbytes or begin < 0:
            raise CheckpointError(f"{path}: tensor {name!r}: offsets {begin}..{end} do not match shape {shape} "
                                  f"of {dtype}")
        if data_start + end > size:
            raise CheckpointError(
                f"{path}: truncated safetensors file: tensor {name!r} ends at byte {data_start + end} "
                f"but the file has {size} bytes"
            )
        entries[name] = TensorEntry(path, dtype, shape, data_start + begin, data_start + end)
    return entries


def index_checkpoint(directory: Path) -> dict[str, TensorEntry]:
    """All tensors of a checkpoint directory, single-file or sharded."""
    single, index = directory / SINGLE_FILE, directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        entries: dict[str, TensorEntry] = {}
        for shard in shards:
            shard_path = directory / shard
            if Path(shard).is_absolute() or ".." in Path(shard).parts:
                raise CheckpointError(f"{index}: shard name {shard!r} points outside the checkpoint directory")
            if not shard_path.is_file():
                raise CheckpointError(f"{index}: shard {shard} is missing from {directory}")
            for name, entry in read_safetensors_header(shard_path).items():
                if weight_map.get(name) != shard:
                    raise CheckpointError(f"{shard_path}: tensor {name!r} is not listed for this shard in {INDEX_FILE}")
                entries[name] = entry
        unlisted = sorted(set(weight_map) - set(entries))
        if unlisted:
            raise CheckpointError(f"{index}: tensors listed but absent from their shards: {_some(unlisted)}")
        return entries
    if single.is_file():
        return read_safetensors_header(single)
    pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
    if pickles:
        raise CheckpointError(
            f"{directory}: only pickle weights found ({', '.join(pickles)}); pickle is never loaded. "
            "Convert them to safetensors (e.g. transformers' save_pretrained(safe_serialization=True))."
        )
    raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}")


def _some(names: list[str], n: int = 20) -> str:
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")


def check_names_and_shapes(model: nn.Module, entries: dict[str, TensorEntry], tied: bool) -> None:
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    on_disk = {n for n in entries if not n.endswith(_IGNORED_SUFFIXES)}
    if tied:
        on_disk.discard("lm_head.weight")  # tied checkpoints may carry a copy; the embedding is the weight
    missing = sorted(set(expected) - on_disk)
    unexpected = sorted(on_disk - set(expected))
    misshaped = sorted(
        f"{n}: {entries[n].shape} on disk, {expected[n]} expected"
        for n in set(expected) & on_disk
        if entries[n].shape != expected[n]
    )
    problems = []
    if missing:
        problems.append(f"missing tensors: {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_some(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped tensors: {_some(misshaped)}")
    if problems:
        raise CheckpointError("checkpoint does not match the config: " + "; ".join(problems))


def read_tensor(entry: TensorEntry, handle) -> torch.Tensor:
    """Read one tensor's bytes straight into a new CPU tensor (no mmap, no intermediate copy)."""
    t = torch.empty(entry.shape, dtype=SAFETENSORS_DTYPES[entry.dtype])
    buf = t.view(-1).view(torch.uint8).numpy() if t.numel() else None
    handle.seek(entry.start)
    if buf is not None and handle.readinto(buf) != buf.nbytes:
        raise CheckpointError(f"{entry.file}: truncated while reading a tensor at byte {entry.start}")
    return t


def _set_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, param_name = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[param_name] = nn.Parameter(tensor, requires_grad=False)


def load_weights(
    directory: Path,
    config: QwenConfig,
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> QwenForCausalLM:
    entries = index_checkpoint(directory)
    with torch.device("meta"):
        model = QwenForCausalLM(config)
    check_names_and_shapes(model, entries, config.tie_word_embeddings)

    wanted = {name for name, _ in model.named_parameters()}
    by_file: dict[Path, list[str]] = {}
    for name in sorted(wanted, key=lambda n: entries[n].start):
        by_file.setdefault(entries[name].file, []).append(name)
    total = sum(entries[n].end - entries[n].start for n in wanted)
    done = 0
    for i, (path, names) in enumerate(sorted(by_file.items()), 1):
        with path.open("rb") as handle:
            for name in names:
                # numerics: stored dtype -> requested dtype is one rounding (or exact when widening)
                t = read_tensor(entries[name], handle).to(device=device, dtype=dtype)
                _set_parameter(model, name, t)
                done += entries[name].end - entries[name].start
        if progress:
            print(f"\rloading weights: shard {i}/{len(by_file)}, {done / 1e6:.1f}/{total / 1e6:.1f} MB",
                  end="\n" if i == len(by_file) else "", file=sys.stderr, flush=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.eval()
    model.requires_grad_(False)
    return model
