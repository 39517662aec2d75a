"""Load HF-format safetensors weights (one file or sharded) into QwenForCausalLM with strict name checks.

The model is built on the meta device and each tensor is read from disk straight into its final place, so
peak memory stays at the size of the weights plus one tensor being converted. Pickle files are never read.
"""

from __future__ import annotations

import json
import math
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qwen_ref.config import QwenConfig
from qwen_ref.dtypes import DTYPES
from qwen_ref.errors import CheckpointError
from qwen_ref.json_files import parse_json_text, read_json_file
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
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
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
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    header = parse_json_text(raw, f"{path}: corrupt safetensors header", CheckpointError, dict)
    data_start = 8 + n
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (begin, end) = _header_entry(path, name, info)
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
    _check_layout(path, entries, data_start, size)
    return entries


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _header_entry(path: Path, name: str, info: Any) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    """One tensor's (dtype, shape, data_offsets) from a header, each field checked and named when wrong."""
    where = f"{path}: corrupt safetensors header entry for {name!r}"
    if not isinstance(info, dict):
        raise CheckpointError(f"{where}: expected an object with dtype, shape and data_offsets")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
    if missing:
        raise CheckpointError(f"{where}: missing {', '.join(missing)}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str):
        raise CheckpointError(f"{where}: dtype: {json.dumps(dtype)[:80]} is not a string")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: shape: {json.dumps(shape)[:80]} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(x) and x >= 0 for x in offsets)):
        raise CheckpointError(f"{where}: data_offsets: {json.dumps(offsets)[:80]} are not two non-negative integers")
    return dtype, tuple(shape), (offsets[0], offsets[1])


def _check_layout(path: Path, entries: dict[str, TensorEntry], data_start: int, size: int) -> None:
    """As the safetensors format requires: the tensors' byte ranges, in order, tile the data section exactly,
    with no overlap (two parameters sharing bytes) and no gap."""
    at = data_start
    for name, e in sorted(entries.items(), key=lambda item: (item[1].start, item[1].end)):
        if e.start < at:
            raise CheckpointError(f"{path}: tensor {name!r} (bytes {e.start - data_start}..{e.end - data_start} of "
                                  "the data) overlaps the tensor before it")
        if e.start > at:
            raise CheckpointError(f"{path}: a gap of {e.start - at} bytes before tensor {name!r}: the offsets do "
                                  "not cover the data section")
        at = e.end
    if at != size:
        raise CheckpointError(f"{path}: {size - at} bytes after the last tensor: the offsets do not cover the data "
                              "section")


def index_checkpoint(directory: Path) -> dict[str, TensorEntry]:
    """All tensors of a checkpoint directory, single-file or sharded."""
    single, index = directory / SINGLE_FILE, directory / INDEX_FILE
    if index.is_file():
        weight_map = read_json_file(index, CheckpointError).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map must be an object of tensor name -> shard file name")
        shards = sorted(set(weight_map.values()))
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


def _check_layer_count(directory: Path, entries: dict[str, TensorEntry], config: QwenConfig) -> None:
    present = {int(m.group(1)) for name in entries if (m := _LAYER.match(name))}
    count = max(present) + 1 if present else 0
    if count != config.num_hidden_layers or len(present) != count:
        raise CheckpointError(f"{directory}: the weights do not match config.json: num_hidden_layers is "
                              f"{config.num_hidden_layers} but the weights hold {len(present)} decoder layers "
                              f"(indices up to {count - 1})")


def check_names_and_shapes(model: nn.Module, entries: dict[str, TensorEntry], tied: bool,
                           where: Path | str = "checkpoint") -> None:
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
        raise CheckpointError(f"{where}: the weights do not match config.json: " + "; ".join(problems))


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


OFFLOADS = ("none", "disk")


def check_offload(offload: str) -> None:
    if offload not in OFFLOADS:
        raise CheckpointError(f"offload: {offload!r} is not supported; allowed: {', '.join(map(repr, OFFLOADS))}")


def load_weights(
    directory: Path,
    config: QwenConfig,
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    progress: bool = False,
    offload: str = "none",
) -> QwenForCausalLM:
    """The model with its weights read in; offload="disk": the decoder layers stay in the files and stream
    through memory one at a time (checkpoint/offload.py)."""
    entries = index_checkpoint(directory)
    _check_layer_count(directory, entries, config)  # before building: a config can claim thousands of layers
    with torch.device("meta"):
        model = QwenForCausalLM(config)
    check_names_and_shapes(model, entries, config.tie_word_embeddings, directory)

    check_offload(offload)
    wanted = {name for name, _ in model.named_parameters()
              if offload == "none" or not name.startswith("model.layers.")}
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
    if offload == "disk":
        from qwen_ref.checkpoint.offload import LayerStreamer  # it reads tensors with this module's read_tensor

        model.streamer = LayerStreamer(model, entries, dtype, device)
    return model
