"""A static, preallocated KV cache for a batch of sequences that each have their own length.

Keys are stored already rotated (RoPE is applied before the write, as in HF). The cache is a plain object,
not an nn.Module, so it is never part of a model's state_dict.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qwen_ref.config import QwenConfig
from qwen_ref.errors import QwenRefError


class CacheFullError(QwenRefError, ValueError):
    """A forward would write past the cache's capacity."""


class KVCache:
    def __init__(
        self,
        config: QwenConfig,
        batch_size: int,
        capacity: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        if batch_size < 1 or capacity < 1:
            raise ValueError(f"KVCache: batch_size={batch_size} and capacity={capacity} must both be >= 1")
        shape = (batch_size, config.num_key_value_heads, capacity, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        # lengths[b]: how many positions of row b hold real keys (= the position of its next token)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.capacity = capacity

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    def positions(self, num_tokens: int) -> torch.Tensor:
        """Positions [B, T] of the next num_tokens tokens of every row."""
        if int(self.lengths.max()) + num_tokens > self.capacity:
            raise CacheFullError(
                f"KV cache capacity {self.capacity} exceeded: a row at length {int(self.lengths.max())} "
                f"cannot take {num_tokens} more token(s)"
            )
        return self.lengths[:, None] + torch.arange(num_tokens, device=self.lengths.device)

    def write(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
        """Store k/v [B, KV, T, D] at positions [B, T]; returns how many leading positions attention must read."""
        rows = torch.arange(self.batch_size, device=positions.device)[:, None]  # [B, 1]
        # advanced indices on dims 0 and 2 move to the front: the target view is [B, T, KV, D]
        self.k[layer][rows, :, positions] = k.transpose(1, 2)
        self.v[layer][rows, :, positions] = v.transpose(1, 2)
        return int(positions[:, -1].max()) + 1

    def advance(self, num_new: torch.Tensor | int) -> None:
        """Mark num_new [B] (or one count for all rows) of the written positions as real."""
        self.lengths += num_new

    def repeat(self, n: int) -> KVCache:
        """A cache of n rows, each a copy of this one-row cache (a shared prompt, prefilled once)."""
        assert self.batch_size == 1, "repeat() copies a single row"
        out = object.__new__(KVCache)
        out.k = [t.repeat(n, 1, 1, 1) for t in self.k]  # always a copy, also for n = 1
        out.v = [t.repeat(n, 1, 1, 1) for t in self.v]
        out.lengths = self.lengths.expand(n).clone()
        out.capacity = self.capacity
        return out

    @staticmethod
    def stack(caches: Sequence[KVCache], rows: Sequence[torch.Tensor] | None = None) -> KVCache:
        """A new cache holding the chosen rows of each cache (all its rows when rows is None), in order, with the
        largest capacity. Only the positions the chosen rows hold are copied; the rest are never read."""
        picks = list(rows) if rows is not None else [torch.arange(c.batch_size, device=c.lengths.device)
                                                     for c in caches]
        assert caches and len(picks) == len(caches), "stack() needs one row index per cache"
        capacity = max(c.capacity for c in caches)
        used = [int(c.lengths[r].max()) if len(r) else 0 for c, r in zip(caches, picks)]

        def merged(parts: list[torch.Tensor]) -> torch.Tensor:
            _, KV, _, D = parts[0].shape
            t = parts[0].new_zeros((sum(len(r) for r in picks), KV, capacity, D))  # [B, KV, capacity, D]
            start = 0
            for p, r, n in zip(parts, picks, used):
                t[start : start + len(r), :, :n] = p[r, :, :n]
                start += len(r)
            return t

        out = object.__new__(KVCache)
        out.k = [merged([c.k[layer] for c in caches]) for layer in range(len(caches[0].k))]
        out.v = [merged([c.v[layer] for c in caches]) for layer in range(len(caches[0].v))]
        out.lengths = torch.cat([c.lengths[r] for c, r in zip(caches, picks)])
        out.capacity = capacity
        return out

    def reset(self, rows: torch.Tensor | list[int] | None = None) -> None:
        """Forget rows (all rows when None); their stale keys are masked by position and overwritten."""
        if rows is None:
            self.lengths.zero_()
        else:
            self.lengths[torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)] = 0
