"""The sampler of docs/sampling.md: parameters, the stages as pure batched functions, the seeded draw,
the batched step of the decode loop, and a trace of one step through every stage.

Where the numbers are computed (the reason each row's result is independent of its batch and device):
- stages 0-2 and the top_k selection run batched on the logits' device, in the logits' dtype. They are
  elementwise IEEE operations (exact or correctly rounded) and exact selections, so every row gets the same
  bits whatever else is in the batch and on any device.
- temperature, top_p, the final softmax and the draw run per row on the CPU in float64 numpy, over the tokens
  that top_k kept, with every sum taken sequentially in a documented order.
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from qwen_ref.errors import InvalidSamplingParams, QwenRefError
from qwen_ref.sampling.rng import SEED_MAX, SEED_MIN, fresh_seed, uniform

NEG_INF = float("-inf")


class SamplingError(QwenRefError, ValueError):
    """The logits cannot be sampled: NaN or +inf in them, every token masked, or a malformed input."""


# ----------------------------------------------------------------------------------------------------------
# Parameters


@dataclass(frozen=True)
class _Rule:
    kind: str  # "number" or "integer", as in the JSON schema
    low: int
    high: int | None

    def describe(self) -> str:
        return f"{self.kind} {self.low}..{self.high}" if self.high is not None else f"{self.kind} >= {self.low}"

    @property
    def noun(self) -> str:
        return "an integer" if self.kind == "integer" else "a number"


_RULES: dict[str, _Rule] = {
    "temperature": _Rule("number", 0, 5),
    "top_p": _Rule("number", 0, 2),
    "top_k": _Rule("integer", 1, 50),
    "seed": _Rule("integer", SEED_MIN, SEED_MAX),
    "repetition_penalty": _Rule("number", 0, 2),
    "frequency_penalty": _Rule("number", 0, 2),
    "presence_penalty": _Rule("number", 0, 2),
    "max_tokens": _Rule("integer", 1, None),
}
_REQUIRED = ("temperature", "max_tokens")  # the fields with a default instead of "absent"
SAMPLING_FIELDS = tuple(_RULES)  # the request fields SamplingParams takes, in the schema's order


def _validated(name: str, value: object) -> int | float:
    rule = _RULES[name]
    allowed = rule.describe()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidSamplingParams(f"{name}: {value!r} is not {rule.noun}; allowed: {allowed}")
    number: int | float = int(value) if isinstance(value, numbers.Integral) else float(value)
    if isinstance(number, float):
        if not math.isfinite(number):
            raise InvalidSamplingParams(f"{name}: {value!r} is not a finite number; allowed: {allowed}")
        if rule.kind == "integer":
            # JSON Schema's "integer" is any number with a zero fractional part, so 2.0 is the integer 2
            if not number.is_integer():
                raise InvalidSamplingParams(f"{name}: {value!r} is not an integer; allowed: {allowed}")
            number = int(number)
    if number < rule.low or (rule.high is not None and number > rule.high):
        raise InvalidSamplingParams(f"{name}: {value!r} is out of range; allowed: {allowed}")
    return float(number) if rule.kind == "number" else number


@dataclass(frozen=True)
class SamplingParams:
    """The request's sampling fields; None means absent (neutral). Values are validated and normalised:
    number fields become float, integer fields int (2.0 is accepted as 2)."""

    temperature: float = 0.6
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    max_tokens: int = 256

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None or f.name in _REQUIRED:
                object.__setattr__(self, f.name, _validated(f.name, value))

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> SamplingParams:
        """From the schema's field names. Every key must be a sampling field; a None value means absent."""
        if not isinstance(d, Mapping):
            raise InvalidSamplingParams(f"sampling parameters: {d!r} is not a mapping of field names to values")
        for key in d:
            if key not in _RULES:
                raise InvalidSamplingParams(
                    f"{key!r} is not a sampling field; allowed: {', '.join(_RULES)}")
        return cls(**{k: v for k, v in d.items() if v is not None})  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, int | float]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _as_params(params: SamplingParams | Mapping[str, object]) -> SamplingParams:
    return params if isinstance(params, SamplingParams) else SamplingParams.from_dict(params)


# ----------------------------------------------------------------------------------------------------------
# Token history for the penalties


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
        rows = torch.repeat_interleave(torch.arange(len(states)), sizes)
        ids = torch.cat([torch.from_numpy(s.ids) for s in states]) if states else torch.zeros(0, dtype=torch.long)
        counts = torch.cat([torch.from_numpy(s.counts) for s in states]) if states else torch.zeros_like(ids)
        return cls(rows.to(device), ids.to(device), counts.to(device))

    def to(self, device: torch.device | str) -> History:
        return History(self.rows.to(device), self.ids.to(device), self.counts.to(device))

    @classmethod
    def from_lists(cls, prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]],
                   device: torch.device | str | None = None) -> History:
        return cls.stack([PenaltyState(p, o) for p, o in zip(prompts, outputs, strict=True)], device)


# ----------------------------------------------------------------------------------------------------------
# Stages: pure functions over a batch of logits [B, V]; per-row parameters are tensors of shape [B]


def mask_disallowed(logits: Tensor, allowed: Tensor | None) -> Tensor:
    """Stage 0: tokens whose entry in the boolean mask `allowed` [B, V] is False get -inf."""
    return logits.clone() if allowed is None else logits.masked_fill(~allowed, NEG_INF)


def repetition_penalty(logits: Tensor, history: History, penalty: Tensor) -> Tensor:
    """Stage 1: every seen token once, z / r if z > 0 else z * r. A row where r = 0, or where z / r
    overflowed to +inf, collapses to the limit r -> 0+: its seen token with the largest positive logit
    (lowest id on ties) keeps its logit and every other token gets -inf."""
    out = logits.clone()
    _repetition_penalty_(out, history, penalty)
    return out


def frequency_presence_penalty(logits: Tensor, history: History, frequency: Tensor, presence: Tensor) -> Tensor:
    """Stage 2: z - f * c - p * (c > 0), with c the count in the output (the prompt does not count)."""
    out = logits.clone()
    _frequency_presence_penalty_(out, history, frequency, presence)
    return out


def _repetition_penalty_(z: Tensor, history: History, penalty: Tensor) -> None:
    # in place on z, touching only the seen tokens
    if history.ids.numel() == 0:
        return
    seen = z[history.rows, history.ids]
    r = penalty.to(z.dtype)[history.rows]  # numerics: r is rounded to the logits' dtype, as in HF
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


def _frequency_presence_penalty_(z: Tensor, history: History, frequency: Tensor, presence: Tensor) -> None:
    # in place on z, touching only the tokens of the output
    in_output = history.counts > 0
    rows, ids = history.rows[in_output], history.ids[in_output]
    if ids.numel() == 0:
        return
    f = frequency.to(z.dtype)[rows]  # numerics: f and p are rounded to the logits' dtype, as in vLLM
    p = presence.to(z.dtype)[rows]
    counts = history.counts[in_output].to(z.dtype)  # exact: counts are far below 2**24
    z[rows, ids] = z[rows, ids] - f * counts - p  # (z - f*c) - p*1, left to right


def greedy(logits: Tensor) -> Tensor:
    """T = 0: the argmax of each row; torch.argmax returns the first maximum, so ties go to the lowest id."""
    return torch.argmax(logits, dim=-1)


def temperature(logits: Tensor, t: Tensor) -> Tensor:
    """Stage 3: z / T on rows with T > 0; rows with T = 0 (greedy) are returned unchanged."""
    t = t.to(logits.dtype)[:, None]  # numerics: T is rounded to the logits' dtype, as in HF
    return torch.where(t > 0, logits / torch.where(t > 0, t, 1.0), logits)


def top_k(logits: Tensor, k: Tensor) -> Tensor:
    """Stage 4: keep every token whose logit is >= the k-th largest of its row (ties at the k-th are all
    kept); the rest get -inf. k <= 0 or k >= V means no limit."""
    kth, _, _ = _kth_largest(logits, k)
    return logits.masked_fill(logits < kth, NEG_INF)


def _kth_largest(logits: Tensor, k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The k-th largest logit of each row ([B, 1]; -inf on rows without a limit), then the values and ids
    of each row's largest logits in order (k_max + 1 of them where possible). topk selects, it does not
    compute, so the values are exact on any device."""
    k = k.to(logits.device)
    limited = (k > 0) & (k < logits.shape[-1])
    k_max = int(k[limited].max()) if bool(limited.any()) else 1
    values, ids = torch.topk(logits, min(k_max + 1, logits.shape[-1]), dim=-1)
    kth = values.gather(1, (k.clamp(1, k_max) - 1)[:, None])
    return torch.where(limited[:, None], kth, NEG_INF), values, ids


def top_p(logits: Tensor, q: Tensor) -> Tensor:
    """Stage 5 on rows with q < 1: keep the smallest prefix of the tokens sorted by probability (descending,
    ties by lower id) whose cumulative probability is >= q, at least one token; the rest get -inf.
    Computed per row on the CPU in float64 (see `_nucleus`), returned in the input's dtype and device."""
    out = logits.clone()
    for row, q_row in enumerate(q.tolist()):
        if q_row >= 1.0:
            continue
        values = logits[row].to("cpu", torch.float64).numpy()  # numerics: exact widening to float64
        finite = np.flatnonzero(np.isfinite(values))
        if finite.size == 0:
            continue
        keep = np.zeros(values.shape, dtype=bool)
        keep[finite[_nucleus(_softmax(values[finite]), q_row)]] = True
        out[row].masked_fill_(~torch.from_numpy(keep).to(logits.device), NEG_INF)
    return out


def _softmax(y: np.ndarray) -> np.ndarray:
    """float64 softmax; the normaliser is the sequential left-to-right sum in position order (np.cumsum is
    a plain loop; np.sum is pairwise and is never used for it)."""
    top = y.max()
    e = np.exp(y - top if top != 0 else y)  # -inf entries give exactly 0; y - 0 would be y anyway
    return e / np.cumsum(e)[-1]


def _nucleus(probs: np.ndarray, q: float) -> np.ndarray:
    """Positions of the smallest prefix of the order (probability descending, position ascending) whose
    sequential cumulative sum is >= q; at least one. Only the needed head of the order is sorted: the
    tokens with probability >= the h-th largest are exactly a prefix of the full order, ties included."""
    n = len(probs)
    head = 64
    while True:
        if head >= n:
            candidates = np.arange(n)
        else:
            threshold = np.partition(probs, n - head)[n - head]
            candidates = np.flatnonzero(probs >= threshold)
        order = candidates[np.argsort(-probs[candidates], kind="stable")]
        cumulative = np.cumsum(probs[order])  # float64, sequential in the sorted order
        cut = int(np.searchsorted(cumulative, q, side="left"))  # the first j with cumulative[j] >= q
        if cut < len(order) or len(order) == n:
            return order[: cut + 1]
        head *= 8


# ----------------------------------------------------------------------------------------------------------
# The final distribution of each row


@dataclass(frozen=True)
class RowDistribution:
    """A row's final distribution, sparse: probs[j] is the probability of token ids[j]; ids ascending.
    Every token not listed has probability exactly 0."""

    ids: np.ndarray  # int64
    probs: np.ndarray  # float64
    greedy: bool

    def dense(self, vocab_size: int) -> Tensor:
        out = torch.zeros(vocab_size, dtype=torch.float64)
        out[torch.from_numpy(self.ids)] = torch.from_numpy(self.probs)
        return out


def _finish_row(ids: np.ndarray, z: np.ndarray, t: float, q: float | None) -> RowDistribution:
    """Stages 3, 5 and 6 for one sampled row; `z` holds the finite stage-2 logits of the tokens top_k kept."""
    with np.errstate(over="ignore"):
        # float64: shift, then scale. max(y) = 0 exactly; for tiny T or huge gaps the others overflow to -inf,
        # which is probability 0, never +inf or NaN
        y = (z - z.max()) / t
    if q is not None and q < 1.0:
        keep = np.sort(_nucleus(_softmax(y), q))
        ids, y = ids[keep], y[keep]
    return RowDistribution(ids, _softmax(y), greedy=False)


def _column(values: Sequence[float], like: Tensor) -> Tensor:
    return torch.tensor(values, dtype=torch.float64, device=like.device)


def _stages_0_to_2(logits: Tensor, params: Sequence[SamplingParams], history: History,
                   allowed: Tensor | None) -> Tensor:
    """Stages 0, 1 and 2 of a batch, with the checks that make an unsamplable row an error, not a NaN."""
    if logits.dim() != 2 or logits.shape[0] != len(params) or not logits.is_floating_point():
        raise SamplingError(f"logits must be a float tensor [B, V] with B = {len(params)} rows; "
                            f"got {tuple(logits.shape)} {logits.dtype}")
    z = _widened(logits)
    if allowed is not None and (allowed.shape != z.shape or allowed.dtype != torch.bool):
        raise SamplingError(f"allowed must be a bool tensor {tuple(z.shape)}; got {tuple(allowed.shape)} "
                            f"{allowed.dtype}")
    row_max = z.amax(dim=-1)  # amax propagates NaN, so one reduction finds NaN, +inf and all -inf
    _check_rows(row_max, "the logits contain NaN or +inf", lambda m: torch.isnan(m) | torch.isposinf(m))
    z0 = z if allowed is None else mask_disallowed(z, allowed.to(z.device))
    if allowed is not None:
        row_max = z0.amax(dim=-1)
    _check_rows(row_max, "every token is masked (all logits are -inf); nothing can be sampled", torch.isneginf)
    if history.ids.numel() and int(history.ids.max()) >= z.shape[-1]:
        raise SamplingError(f"token id {int(history.ids.max())} in the history is outside the vocabulary "
                            f"of {z.shape[-1]}")
    if history.ids.numel() == 0:
        return z0
    history = history.to(z.device)
    r = _column([_or(p.repetition_penalty, 1.0) for p in params], z)
    f = _column([_or(p.frequency_penalty, 0.0) for p in params], z)
    pr = _column([_or(p.presence_penalty, 0.0) for p in params], z)
    z2 = z0.clone()  # the one working copy; stages 1 and 2 write only the seen tokens' entries
    _repetition_penalty_(z2, history, r)
    _frequency_presence_penalty_(z2, history, f, pr)
    return z2


def _widened(logits: Tensor) -> Tensor:
    # numerics: float16/bfloat16 logits are widened (exactly) to float32; float32 and float64 stay as they are
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def _check_rows(row_max: Tensor, problem: str, bad: Callable[[Tensor], Tensor]) -> None:
    rows = torch.nonzero(bad(row_max)).flatten().tolist()
    if rows:
        raise SamplingError(f"row {rows[0]}: {problem}")


def _distributions(z: Tensor, params: Sequence[SamplingParams]) -> list[RowDistribution]:
    """From the stage-2 logits of a batch to each row's final distribution."""
    out: list[RowDistribution | None] = [None] * len(params)
    greedy_rows = [b for b, p in enumerate(params) if p.greedy]
    if greedy_rows:
        for b, token in zip(greedy_rows, greedy(z[greedy_rows]).tolist(), strict=True):
            out[b] = RowDistribution(np.array([token], dtype=np.int64), np.ones(1), greedy=True)
    sampled = [b for b, p in enumerate(params) if not p.greedy]
    if sampled:
        zs = z if len(sampled) == len(params) else z[sampled]
        for i, (ids, values) in enumerate(_top_k_survivors(zs, [params[b].top_k or 0 for b in sampled])):
            p = params[sampled[i]]
            out[sampled[i]] = _finish_row(ids, values, p.temperature, p.top_p)
    return out  # type: ignore[return-value]


def _top_k_survivors(z: Tensor, k: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per row, the ascending ids of the finite tokens that stage 4 keeps (the same set as
    isfinite(top_k(z, k)), without writing a masked [B, V] tensor) and their logits, widened to float64."""
    vocab = z.shape[-1]
    limited = [0 < kb < vocab for kb in k]
    if any(limited):
        kth, top_values, top_ids = _kth_largest(z, torch.tensor(k))
        after_kth = top_values.gather(1, torch.tensor(k, device=z.device).clamp(0, top_values.shape[1] - 1)[:, None])
        tie_after_kth = (after_kth == kth)[:, 0].tolist()  # is the (k+1)-th largest equal to the k-th?
    out = []
    for b, kb in enumerate(k):
        if not limited[b]:
            row = z[b].to("cpu", torch.float64).numpy()  # numerics: exact widening to float64
            if np.isneginf(row).any():
                ids = np.flatnonzero(row > NEG_INF)
                out.append((ids, row[ids]))
            else:
                out.append((np.arange(len(row)), row))
            continue
        if not tie_after_kth[b]:  # the k largest are exactly the tokens >= the k-th
            ids_t = top_ids[b, :kb].sort().values
        else:
            ids_t = torch.nonzero(z[b] >= kth[b]).flatten()
        ids_t = ids_t[z[b, ids_t] > NEG_INF]
        out.append((ids_t.cpu().numpy(), z[b, ids_t].to("cpu", torch.float64).numpy()))  # exact widening
    return out


def distribution(logits: Tensor, params: SamplingParams | Mapping[str, object], prompt_ids: Iterable[int] = (),
                 output_ids: Iterable[int] = (), allowed: Tensor | None = None) -> Tensor:
    """The final distribution (float64, CPU, shape [V]) that the draw uses for 1-D `logits`; for
    temperature 0 it is one-hot on the greedy token. `params` uses the schema's field names."""
    sp = _as_params(params)
    if logits.dim() != 1:
        raise SamplingError(f"distribution: logits must be 1-D [V]; got shape {tuple(logits.shape)}")
    history = History.stack([PenaltyState(prompt_ids, output_ids)])
    z2 = _stages_0_to_2(logits[None], [sp], history, None if allowed is None else allowed[None])
    return _distributions(z2, [sp])[0].dense(logits.shape[-1])


# ----------------------------------------------------------------------------------------------------------
# The draw


def _draw_index(probs: np.ndarray, u: float) -> int:
    cdf = np.cumsum(probs)  # float64, sequential left to right in token-id order
    i = int(np.searchsorted(cdf, u * cdf[-1], side="right"))  # the smallest i with cdf[i] > u * total
    if i == len(cdf):  # u * total rounded up to total: the last token with nonzero probability
        i = int(np.flatnonzero(probs)[-1])
    return i


def draw(probs: Tensor | np.ndarray, seed: int, step: int) -> int:
    """The seeded draw from a final distribution over token ids 0..V-1 (docs/sampling.md, "The draw")."""
    p = torch.as_tensor(probs).detach().to("cpu", torch.float64).numpy()
    if p.ndim != 1 or not np.all(np.isfinite(p)) or np.any(p < 0) or not np.any(p > 0):
        raise SamplingError("draw: probs must be a 1-D vector of finite, non-negative values, not all zero")
    return _draw_index(p, uniform(seed, step))


# ----------------------------------------------------------------------------------------------------------
# The batched step of the decode loop


@dataclass
class RequestState:
    """A request's sampler state: its parameters, penalty history, seed and the index of its next draw."""

    params: SamplingParams
    penalties: PenaltyState
    seed: int
    step: int = 0

    @classmethod
    def start(cls, params: SamplingParams | Mapping[str, object], prompt_ids: Iterable[int]) -> RequestState:
        sp = _as_params(params)
        return cls(sp, PenaltyState(prompt_ids), sp.seed if sp.seed is not None else fresh_seed())

    def accept(self, token: int) -> None:
        """Record the token this request produced; the next draw uses the next step."""
        self.penalties.add_output(token)
        self.step += 1


@dataclass(frozen=True)
class TokenLogprobs:
    """The chosen token's log-probability under the raw distribution (log_softmax of the model's logits)
    and under the final sampling distribution, with the n best alternatives of each (ties: lower id)."""

    token: int
    raw: float
    final: float
    raw_top: tuple[tuple[int, float], ...]
    final_top: tuple[tuple[int, float], ...]


def sample(logits: Tensor, rows: Sequence[RequestState], *, allowed: Tensor | None = None,
           logprobs: int | None = None) -> tuple[Tensor, list[TokenLogprobs] | None]:
    """One decode step: a token per row of `logits` [B, V], drawn with rows[b]'s parameters, history, seed and
    step. Does not advance the rows (call `accept`). With `logprobs=n`, also per-row TokenLogprobs."""
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int) or logprobs < 0):
        raise SamplingError(f"logprobs: {logprobs!r} must be a non-negative integer (the number of alternatives)")
    params = [r.params for r in rows]
    z2 = _stages_0_to_2(logits, params, History.stack([r.penalties for r in rows]), allowed)
    dists = _distributions(z2, params)
    tokens = [int(d.ids[0] if d.greedy else d.ids[_draw_index(d.probs, uniform(r.seed, r.step))])
              for d, r in zip(dists, rows, strict=True)]
    info = None if logprobs is None else _logprobs(logits, tokens, dists, logprobs)
    return torch.tensor(tokens, dtype=torch.long, device=logits.device), info


def _logprobs(logits: Tensor, tokens: list[int], dists: list[RowDistribution], n: int) -> list[TokenLogprobs]:
    raw = torch.log_softmax(logits.to(torch.float64), dim=-1)  # float64 keeps the digits of small logprobs
    chosen = raw.gather(1, torch.tensor(tokens, device=raw.device)[:, None])[:, 0].tolist()
    raw_tops = _raw_top(raw, n)
    out = []
    for token, raw_lp, raw_top, d in zip(tokens, chosen, raw_tops, dists, strict=True):
        with np.errstate(divide="ignore"):
            log_p = np.log(d.probs)  # exact zeros (underflow) give -inf
        order = [j for j in np.lexsort((d.ids, -d.probs)) if d.probs[j] > 0][:n]  # p descending, then lower id
        final = float(log_p[np.searchsorted(d.ids, token)])
        out.append(TokenLogprobs(token, raw_lp, final, raw_top,
                                 tuple((int(d.ids[j]), float(log_p[j])) for j in order)))
    return out


def _raw_top(raw: Tensor, n: int) -> list[tuple[tuple[int, float], ...]]:
    if n <= 0:
        return [()] * raw.shape[0]
    kth = torch.topk(raw, min(n, raw.shape[-1]), dim=-1).values[:, -1:]
    out = []
    for row in range(raw.shape[0]):
        ids = torch.nonzero(raw[row] >= kth[row]).flatten().cpu().numpy()  # the n best, ties at the n-th included
        values = raw[row, torch.from_numpy(ids).to(raw.device)].cpu().numpy()
        order = np.lexsort((ids, -values))[:n]
        out.append(tuple((int(ids[j]), float(values[j])) for j in order))
    return out


# ----------------------------------------------------------------------------------------------------------
# Trace of one step


@dataclass(frozen=True)
class Candidate:
    id: int
    logit: float
    prob: float


@dataclass(frozen=True)
class StageView:
    """The state after one stage: logits and probabilities over the vocabulary (float64, CPU), the number of
    tokens still possible, the entropy in nats and the best candidates (probability descending, lower id)."""

    name: str
    logits: Tensor
    probs: Tensor
    kept: int
    entropy: float
    top: tuple[Candidate, ...]
    note: str = ""


@dataclass(frozen=True)
class Trace:
    params: SamplingParams
    stages: tuple[StageView, ...]
    token: int | None  # the greedy token, or the drawn token when a seed was given; else None

    def stage(self, name: str) -> StageView:
        return next(s for s in self.stages if s.name == name)

    @property
    def final(self) -> StageView:
        return self.stages[-1]


def _view(name: str, logits: np.ndarray, probs: np.ndarray, top: int, note: str = "",
          possible: np.ndarray | None = None) -> StageView:
    nonzero = probs[probs > 0]
    entropy = float(-(nonzero * np.log(nonzero)).sum()) + 0.0  # + 0.0 turns -0.0 into 0.0
    best = np.lexsort((np.arange(len(probs)), -probs))[: min(top, len(nonzero))]
    kept = int((np.isfinite(logits) if possible is None else possible).sum())
    return StageView(name, torch.from_numpy(logits.copy()), torch.from_numpy(probs.copy()), kept, entropy,
                     tuple(Candidate(int(i), float(logits[i]), float(probs[i])) for i in best), note)


def _masked(values: np.ndarray, keep: np.ndarray) -> np.ndarray:
    return np.where(keep, values, NEG_INF)


def trace(logits: Tensor, params: SamplingParams | Mapping[str, object], prompt_ids: Iterable[int] = (),
          output_ids: Iterable[int] = (), top: int = 10, *, allowed: Tensor | None = None,
          seed: int | None = None, step: int = 0) -> Trace:
    """Every stage of one step for 1-D `logits`. The final stage is exactly `distribution(...)`; with a
    seed, `token` is the token that draw (seed, step) picks."""
    sp = _as_params(params)
    if logits.dim() != 1:
        raise SamplingError(f"trace: logits must be 1-D [V]; got shape {tuple(logits.shape)}")
    history = History.stack([PenaltyState(prompt_ids, output_ids)])
    row_allowed = None if allowed is None else allowed[None]
    dist = _distributions(_stages_0_to_2(logits[None], [sp], history, row_allowed), [sp])[0]
    final = dist.dense(logits.shape[-1]).numpy()
    x = _widened(logits[None])
    history = history.to(x.device)
    z0 = mask_disallowed(x, row_allowed)
    z1 = repetition_penalty(z0, history, _column([_or(sp.repetition_penalty, 1.0)], x))
    z2 = frequency_presence_penalty(z1, history, _column([_or(sp.frequency_penalty, 0.0)], x),
                                    _column([_or(sp.presence_penalty, 0.0)], x))
    raw, z0, z1, z2 = (t[0].to("cpu", torch.float64).numpy() for t in (x, z0, z1, z2))  # exact, for display
    stages = [_view("raw", raw, _softmax(raw), top)]
    if allowed is not None:
        stages.append(_view("mask", z0, _softmax(z0), top))
    stages.append(_view("repetition_penalty", z1, _softmax(z1), top, _noop(sp.repetition_penalty in (None, 1.0))))
    stages.append(_view("frequency_presence", z2, _softmax(z2), top,
                        _noop(not (sp.frequency_penalty or sp.presence_penalty))))
    if dist.greedy:
        token = int(dist.ids[0])
        argmax = _masked(z2, final > 0)
        stages.append(_view("temperature", argmax, final, top, f"T=0: greedy, argmax = {token}"))
        stages += [_view(name, argmax, final, top, "skipped (greedy)") for name in ("top_k", "top_p")]
        stages.append(_view("final", argmax, final, top))
        return Trace(sp, tuple(stages), token)
    t = sp.temperature
    finite = np.isfinite(z2)
    with np.errstate(over="ignore"):
        scaled = z2 / t  # the logits as the spec writes them (display only: tiny T may overflow them)
        shifted = _masked((z2 - z2[finite].max()) / t, finite)  # what the probabilities are computed from
    stages.append(_view("temperature", scaled, _softmax(shifted), top, _noop(t == 1.0), finite))
    in_top_k = np.isfinite(top_k(torch.from_numpy(z2)[None], torch.tensor([sp.top_k or 0]))[0].numpy())
    stages.append(_view("top_k", _masked(scaled, in_top_k), _softmax(_masked(shifted, in_top_k)), top,
                        _noop(in_top_k.sum() == finite.sum()), in_top_k))
    in_top_p = np.zeros(len(final), dtype=bool)
    in_top_p[dist.ids] = True
    stages.append(_view("top_p", _masked(scaled, in_top_p), final, top, _noop(in_top_p.sum() == in_top_k.sum()),
                        in_top_p))
    stages.append(_view("final", _masked(scaled, in_top_p), final, top, possible=in_top_p))
    token = None if seed is None else int(dist.ids[_draw_index(dist.probs, uniform(seed, step))])
    return Trace(sp, tuple(stages), token)


def _or(value: float | None, absent: float) -> float:
    return absent if value is None else value


def _noop(is_noop: bool) -> str:
    return "no-op" if is_noop else ""


_SHORT = {"raw": "raw", "mask": "mask", "repetition_penalty": "rep", "frequency_presence": "freq/pres",
          "temperature": "temp", "top_k": "top_k", "top_p": "top_p", "final": "final"}


def format_trace(tr: Trace, decode: Callable[[int], str] | None = None) -> str:
    """A fixed-width table: one line per stage, then the best candidates with their probability at each stage."""
    def text(i: int) -> str:
        return repr(decode(i))[:16] if decode is not None else ""

    lines = ["params: " + " ".join(f"{k}={v}" for k, v in tr.params.to_dict().items())]
    if tr.token is not None:
        lines.append(f"token: {tr.token} {text(tr.token)}".rstrip())
    lines.append(f"{'stage':<20}{'kept':>8}{'entropy':>10}  {'top-1':<30}note")
    for s in tr.stages:
        best = s.top[0] if s.top else None
        top1 = f"{best.id} {text(best.id)} p={best.prob:.4f}" if best else ""
        lines.append(f"{s.name:<20}{s.kept:>8}{s.entropy:>10.4f}  {top1:<30}{s.note}".rstrip())
    ids = list(dict.fromkeys([c.id for c in tr.final.top] + [c.id for c in tr.stages[0].top]))
    lines.append("")
    lines.append(f"{'id':>8}  {'token':<16}{'raw logit':>11}" + "".join(f"{_SHORT[s.name]:>11}" for s in tr.stages))
    for i in ids:
        probs = "".join(f"{float(s.probs[i]):>11.6f}" if s.probs[i] > 0 else f"{'-':>11}" for s in tr.stages)
        lines.append(f"{i:>8}  {text(i):<16}{float(tr.stages[0].logits[i]):>11.4f}{probs}")
    return "\n".join(lines)


__all__ = [
    "Candidate",
    "History",
    "PenaltyState",
    "RequestState",
    "RowDistribution",
    "SamplingError",
    "SamplingParams",
    "StageView",
    "TokenLogprobs",
    "Trace",
    "distribution",
    "draw",
    "format_trace",
    "frequency_presence_penalty",
    "greedy",
    "mask_disallowed",
    "repetition_penalty",
    "sample",
    "temperature",
    "top_k",
    "top_p",
    "trace",
]
