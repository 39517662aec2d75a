"""KV caches: what a forward reads and extends.

Keys are stored already rotated (RoPE is applied before the write, as in HF). Caches are plain objects, not
nn.Modules, so they are never part of a model's state_dict. The model talks to a cache through three calls:
`positions(T)` (where the next T tokens of each row go), `update(layer, positions, k, v)` (store them, and
get back the key groups attention reads) and `advance(num_new)`.

KVCache is a batch of rows in one padded tensor per layer, as HF's cache: rows of different lengths attend
over the longest row's keys, with a mask. It can grow. RowCaches is a batch whose rows each keep their own
one-row KVCache, as the engine holds them: each row attends over exactly its own keys, which is the
arithmetic of the row run alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from qwen_ref.config import QwenConfig
from qwen_ref.errors import QwenRefError


class CacheFullError(QwenRefError, ValueError):
    """A forward would write past the cache's capacity."""


@dataclass
class KeyGroup:
    """Rows first:end of a forward and the keys/values they attend over, [end - first, KV, S, D].
    exact_rows: each row's queries are the last T of its S keys (no padding beyond its length), so attention needs
    no positions; else the forward's positions [B, T] give each row's causal mask."""

    first: int
    end: int
    k: torch.Tensor
    v: torch.Tensor
    exact_rows: bool


def bytes_per_token(config: QwenConfig, dtype: torch.dtype) -> int:
    """Cache bytes one token takes: keys and values of every layer."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * itemsize


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
        shape = (batch_size, config.num_key_value_heads, capacity, config.head_dim)  # [B, KV, capacity, D]
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        # lengths[b]: how many positions of row b hold real keys (= the position of its next token)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.capacity = capacity

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k) + sum(t.nbytes for t in self.v)

    def positions(self, num_tokens: int) -> torch.Tensor:
        """Positions [B, T] of the next num_tokens tokens of every row."""
        if int(self.lengths.max()) + num_tokens > self.capacity:
            raise CacheFullError(
                f"KV cache capacity {self.capacity} exceeded: a row at length {int(self.lengths.max())} "
                f"cannot take {num_tokens} more token(s)"
            )
        return self.lengths[:, None] + torch.arange(num_tokens, device=self.lengths.device)

    def update(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[KeyGroup]:
        """Store k/v [B, KV, T, D] at positions [B, T]; all rows attend over the keys up to the furthest write."""
        if self.batch_size == 1:  # one row: its positions are consecutive
            start, T = int(positions[0, 0]), positions.shape[1]
            self.k[layer][:, :, start : start + T] = k
            self.v[layer][:, :, start : start + T] = v
        else:
            rows = torch.arange(self.batch_size, device=positions.device)[:, None]  # [B, 1]
            # advanced indices on dims 0 and 2 move to the front: the target view is [B, T, KV, D]
            self.k[layer][rows, :, positions] = k.transpose(1, 2)
            self.v[layer][rows, :, positions] = v.transpose(1, 2)
        num_keys = int(positions[:, -1].max()) + 1
        # one row holds exactly its own keys; several rows are padded to the longest, and need their positions
        return [KeyGroup(0, self.batch_size, self.k[layer][:, :, :num_keys], self.v[layer][:, :, :num_keys],
                         self.batch_size == 1)]

    def advance(self, num_new: torch.Tensor | int) -> None:
        """Mark num_new [B] (or one count for all rows) of the written positions as real."""
        self.lengths += num_new

    def grow(self, capacity: int) -> None:
        """Room for `capacity` positions per row; the positions in use keep their keys."""
        if capacity <= self.capacity:
            return
        used = int(self.lengths.max())

        def grown(t: torch.Tensor) -> torch.Tensor:
            B, KV, _, D = t.shape
            out = t.new_zeros((B, KV, capacity, D))  # [B, KV, capacity, D]
            out[:, :, :used] = t[:, :, :used]
            return out

        self.k = [grown(t) for t in self.k]
        self.v = [grown(t) for t in self.v]
        self.capacity = capacity

    def clone(self) -> KVCache:
        """A copy holding the positions in use (n samples of one prompt start from copies of its cache)."""
        used = int(self.lengths.max())
        out = object.__new__(type(self))
        out.k = [t[:, :, :used].clone() for t in self.k]
        out.v = [t[:, :, :used].clone() for t in self.v]
        out.lengths = self.lengths.clone()
        out.capacity = used
        return out


# write_rows(caches, new [B, KV, T, D], starts) -> each row's filled part: row b's new keys (or values) copied into
# its own [1, KV, capacity, D] cache at starts[b], for all rows in one call (a backend's; the copies change no value)
WriteRows = Callable[[list[torch.Tensor], torch.Tensor, list[int]], list[torch.Tensor]]


class RowCaches:
    """A batch of rows, each with its own one-row KVCache (its own length and capacity). write_rows: a backend's
    one-call copy into all the rows' caches (Backends.write_rows); without it each row's cache writes its own."""

    def __init__(self, caches: Sequence[KVCache], write_rows: WriteRows | None = None):
        assert caches and all(c.batch_size == 1 for c in caches), "RowCaches takes one-row caches"
        self.caches = list(caches)
        self.lengths = torch.cat([c.lengths for c in self.caches])
        self.write_rows = write_rows

    @property
    def batch_size(self) -> int:
        return len(self.caches)

    def positions(self, num_tokens: int) -> torch.Tensor:
        return torch.cat([c.positions(num_tokens) for c in self.caches])  # [B, T]

    def update(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[KeyGroup]:
        if self.write_rows is not None and all(c.k[layer].is_contiguous() for c in self.caches):
            starts = positions[:, 0].tolist()  # each row's positions are consecutive from its length
            ks = self.write_rows([c.k[layer] for c in self.caches], k, starts)
            vs = self.write_rows([c.v[layer] for c in self.caches], v, starts)
            return [KeyGroup(row, row + 1, kr, vr, True) for row, (kr, vr) in enumerate(zip(ks, vs))]
        groups = []
        for row, cache in enumerate(self.caches):
            (g,) = cache.update(layer, positions[row : row + 1], k[row : row + 1], v[row : row + 1])
            groups.append(KeyGroup(row, row + 1, g.k, g.v, True))
        return groups

    def advance(self, num_new: torch.Tensor | int) -> None:
        counts = num_new.tolist() if isinstance(num_new, torch.Tensor) else [num_new] * len(self.caches)
        for cache, n in zip(self.caches, counts):
            cache.advance(n)
        self.lengths = torch.cat([c.lengths for c in self.caches])
