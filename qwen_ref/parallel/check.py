"""What one rank of a tensor-parallel check runs (tests/test_tensor_parallel.py, benchmarks): the logits of a
full forward, then of the same ids through the KV cache (a 2-chunk prefill and decode steps); rank 0 saves them."""

from __future__ import annotations

from pathlib import Path

import torch

from qwen_ref.config import QwenConfig
from qwen_ref.parallel.tp import load_tensor_parallel


def cached_logits(model: torch.nn.Module, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[1, T, V]: ids through the KV cache: the first half as one chunk, the rest one token at a time."""
    cache = model.new_cache(1, ids.shape[1])
    half = ids.shape[1] // 2
    outs = [model(ids[:, :half], cache=cache)]
    outs += [model(ids[:, t : t + 1], cache=cache) for t in range(half, ids.shape[1])]
    return torch.cat(outs, dim=1)


@torch.inference_mode()
def rank_logits(rank: int, world: int, directory: str, dtype: torch.dtype, ids: list[int], out: str,
                exact: bool = False) -> None:
    config = QwenConfig.from_file(Path(directory) / "config.json")
    model = load_tensor_parallel(Path(directory), config, dtype=dtype, rank=rank, world=world,
                                 exact=exact)
    x = torch.tensor([ids])
    full, cached = model(x), cached_logits(model, x, dtype)
    if rank == 0:
        torch.save({"full": full, "cached": cached}, out)
