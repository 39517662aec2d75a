"""Stages 1 and 2, the penalties, and the token history they read: per request a PenaltyState that the
decode loop grows by one token per step, per batch a History in coordinate form."""

from __future__ import annotations

import numbers
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from qwen_ref.sampling.params import SamplingParams
from qwen_ref.sampling.stages import NEG_INF, SamplingError


class PenaltyState:
    """One request's history as the penalties need it: the distinct ids of prompt ∪ output, and how often
    each occurs in the output. The decode loop calls `add_output` with each new token (O(1) per token)."""

    def __init__(self, prompt_ids: Iterable[int] = (), output_ids: Iterable[int] = ()) -> None:
        output = _token_ids(output_ids)
        counts = Counter(output)
        seen = dict.fromkeys([*_token_ids(prompt_ids), *output])
        capacity = max(64, 2 * len(seen))
        self._ids = np.zeros(capacity, dtype=np.int64)
        self._counts = np.zeros(capacity, dtype=np.int64)
        self._ids[: len(seen)] = list(seen)
        self._counts[: len(seen)] = [counts.get(t, 0) for t in seen]
        self._position = {t: i for i, t in enumerate(seen)}

    def __len__(self) -> int:
        return len(self._position)

    def add_output(self, tokens: int | Iterable[int]) -> None:
        for token in (tokens,) if isinstance(tokens, numbers.Integral) else tokens:
            position = self._slot(_token_id(token))  # may reallocate the buffers
            self._counts[position] += 1

    def _slot(self, token: int) -> int:
        position = self._position.get(token)
        if position is None:
            position = len(self._position)
            if position == len(self._ids):
                self._ids = np.concatenate([self._ids, np.zeros_like(self._ids)])
                self._counts = np.concatenate([self._counts, np.zeros_like(self._counts)])
            self._ids[position] = token
            self._counts[position] = 0
            self._position[token] = position
        return position

    @property
    def ids(self) -> np.ndarray:
        """The distinct seen ids, in order of first appearance."""
        return self._ids[: len(self)]

    @property
    def counts(self) -> np.ndarray:
        """Occurrences of each of `ids` in the output (0 for tokens seen only in the prompt)."""
        return self._counts[: len(self)]

    def seen_mask(self, vocab_size: int) -> Tensor:
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        mask[torch.from_numpy(self.ids)] = True
        return mask

    def output_counts(self, vocab_size: int) -> Tensor:
        dense = torch.zeros(vocab_size, dtype=torch.long)
        dense[torch.from_numpy(self.ids)] = torch.from_numpy(self.counts)
        return dense


def _token_ids(tokens: Iterable[int]) -> list[int]:
    array = np.asarray(tokens if isinstance(tokens, (np.ndarray, Tensor)) else list(tokens))
    if array.size == 0:
        return []
    if array.ndim != 1 or array.dtype.kind not in "iu" or int(array.min()) < 0:
        raise SamplingError(f"token ids {tokens!r} are not a list of non-negative integers")
    return array.tolist()


def _token_id(token: object) -> int:
    if isinstance(token, bool) or not isinstance(token, numbers.Integral) or int(token) < 0:
        raise SamplingError(f"token id {token!r} in the history is not a non-negative integer")
    return int(token)


@dataclass(frozen=True)
class History:
    """The histories of a batch in coordinate form: entry j says token ids[j] was seen by row rows[j] and
    occurs counts[j] times in that row's output. Ids are distinct within a row."""

    rows: Tensor  # int64 [N]
    ids: Tensor  # int64 [N]
    counts: Tensor  # int64 [N]

    @classmethod
    def stack(cls, states: Sequence[PenaltyState], device: torch.device | str | None = None) -> History:
        sizes = torch.tensor([len(s) for s in states], dtype=torch.long)
        rows = torch.repeat_interleave(torch.arange(len(states)), sizes)  # [B] sizes -> [N] row of each entry
        ids = torch.cat([torch.from_numpy(s.ids) for s in states]) if states else torch.zeros(0, dtype=torch.long)
        counts = torch.cat([torch.from_numpy(s.counts) for s in states]) if states else torch.zeros_like(ids)
        return cls(rows.to(device), ids.to(device), counts.to(device))

    def to(self, device: torch.device | str) -> History:
        return History(self.rows.to(device), self.ids.to(device), self.counts.to(device))

    @classmethod
    def from_lists(cls, prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]],
                   device: torch.device | str | None = None) -> History:
        return cls.stack([PenaltyState(p, o) for p, o in zip(prompts, outputs, strict=True)], device)


def penalty_values(params: Sequence[SamplingParams], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Per row (float64 [B]) the repetition, frequency and presence penalties, absent ones at their neutral
    values 1, 0 and 0."""
    def column(values: list[float | None], absent: float) -> Tensor:
        return torch.tensor([absent if v is None else v for v in values], dtype=torch.float64, device=device)

    return (column([p.repetition_penalty for p in params], 1.0),
            column([p.frequency_penalty for p in params], 0.0),
            column([p.presence_penalty for p in params], 0.0))


def repetition_penalty(logits: Tensor, history: History, penalty: Tensor) -> Tensor:
    """Stage 1: every seen token once, z / r if z > 0 else z * r. A row where r = 0, or where z / r
    overflowed to +inf, collapses to the limit r -> 0+: its seen token with the largest positive logit
    (lowest id on ties) keeps its logit and every other token gets -inf."""
    out = logits.clone()
    repetition_penalty_(out, history, penalty)
    return out


def frequency_presence_penalty(logits: Tensor, history: History, frequency: Tensor, presence: Tensor) -> Tensor:
    """Stage 2: z - f * c - p * (c > 0), with c the count in the output (the prompt does not count)."""
    out = logits.clone()
    frequency_presence_penalty_(out, history, frequency, presence)
    return out


def repetition_penalty_(z: Tensor, history: History, penalty: Tensor) -> None:
    """Stage 1 in place on z [B, V], touching only the seen tokens."""
    if history.ids.numel() == 0:
        return
    seen = z[history.rows, history.ids]  # [N]
    r = penalty.to(z.dtype)[history.rows]  # [B] -> [N]; numerics: r is rounded to the logits' dtype, as in HF
    positive = seen > 0
    divided = seen / r  # +inf where r = 0 (or on overflow): those rows collapse below
    multiplied = torch.where(torch.isneginf(seen), seen, seen * r)  # -inf * 0 would be NaN: -inf stays
    penalized = torch.where(positive, divided, multiplied)
    z[history.rows, history.ids] = penalized
    overflowed = positive & torch.isposinf(penalized)
    if bool(overflowed.any()):
        for row in torch.unique(history.rows[overflowed]).tolist():
            candidates = (history.rows == row) & positive
            ids, values = history.ids[candidates], seen[candidates]
            winner = int(ids[values == values.max()].min())
            z[row] = NEG_INF
            z[row, winner] = values[ids == winner][0]


def frequency_presence_penalty_(z: Tensor, history: History, frequency: Tensor, presence: Tensor) -> None:
    """Stage 2 in place on z [B, V], touching only the tokens of the output."""
    in_output = history.counts > 0
    rows, ids = history.rows[in_output], history.ids[in_output]  # [M], the entries with a count
    if ids.numel() == 0:
        return
    f = frequency.to(z.dtype)[rows]  # [B] -> [M]; numerics: f and p are rounded to the logits' dtype, as in vLLM
    p = presence.to(z.dtype)[rows]
    counts = history.counts[in_output].to(z.dtype)  # exact: counts are far below 2**24
    z[rows, ids] = z[rows, ids] - f * counts - p  # (z - f*c) - p*1, left to right
