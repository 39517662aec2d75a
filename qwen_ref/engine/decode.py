"""The decode loop: prefill a batch of prompts into a KV cache, then one token per row per step.

The loop asks a `choose` callable for each step's tokens; the model never samples. Rows stop independently
(at a stop id or their own token budget) and a stopped row no longer advances its cache.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from qwen_ref.models.kv_cache import KVCache
from qwen_ref.models.qwen2 import QwenForCausalLM
from qwen_ref.sampling.json_mask import batch_allowed
from qwen_ref.sampling.sampler import sample

# choose(logits [B, V] float, active [B] bool, step) -> tokens [B] long
Chooser = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def greedy(logits: torch.Tensor, active: torch.Tensor, step: int) -> torch.Tensor:
    # torch.argmax returns the first maximum: ties break to the lowest token id
    return logits.argmax(dim=-1)


@dataclass
class Step:
    index: int
    tokens: list[int | None]  # the token each row produced at this step; None for rows already stopped
    finished: list[bool]  # rows that stopped at this step or before


def right_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    ids = torch.full((len(prompts), int(lengths.max())), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
    return ids, lengths


@torch.inference_mode()
def decode(
    model: QwenForCausalLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int | Sequence[int],
    *,
    choose: Chooser = greedy,
    stop_ids: Sequence[int] = (),
    batch_invariant: bool = False,
) -> Iterator[Step]:
    """Yields one Step per decoding step until every row has stopped.

    Rows never read each other's keys, but a matmul over B rows may round differently from the same matmul
    over one row (BLAS picks its kernel by shape), so batched logits can differ from a row's logits alone in
    the last bits. With batch_invariant=True a seeded request draws the same tokens in any batch: on a model
    loaded with decode_linear="invariant" the rows still decode as one batch (each prompt prefilled alone, then
    batch-invariant decode steps); otherwise each row runs its own forward with its own cache.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("decode: every prompt needs at least one token")
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(prompts) or any(b < 0 for b in budgets):
        raise ValueError(f"decode: max_new_tokens {max_new_tokens!r} must be >= 0, one per prompt")
    device = model.lm_head.weight.device
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    budget = torch.tensor(budgets, dtype=torch.long, device=device)
    active = budget > 0
    if batch_invariant and len(prompts) > 1 and not model.backends.batch_invariant:
        forward, logits = _rowwise(model, prompts, max(budgets), device)
    elif batch_invariant and len(prompts) > 1:
        forward, logits = _invariant_batched(model, prompts, max(budgets), device)
    else:
        forward, logits = _batched(model, prompts, max(budgets), device)
    step = 0
    while bool(active.any()):
        tokens = choose(logits, active, step)
        produced = active.clone()
        budget -= produced.long()
        active &= (budget > 0) & ~torch.isin(tokens, stop)
        yield Step(step, [int(t) if p else None for t, p in zip(tokens.tolist(), produced.tolist())],
                   (~active).tolist())
        step += 1
        if not bool(active.any()):
            break
        logits = forward(tokens, active, logits)


def _prefill(model: QwenForCausalLM, prompts: Sequence[Sequence[int]], budget: int, device):
    ids, lengths = right_pad(prompts)
    ids, lengths = ids.to(device), lengths.to(device)
    cache = KVCache(model.config, ids.shape[0], int(ids.shape[1]) + budget, dtype=model.lm_head.weight.dtype,
                    device=device)
    return cache, model(ids, cache=cache, num_new=lengths, last_only=True)[:, 0]  # [B, V]


def _is_shared(prompts: Sequence[Sequence[int]]) -> bool:
    return len(prompts) > 1 and all(list(p) == list(prompts[0]) for p in prompts[1:])


def _batched(model, prompts, budget, device):
    """One forward for the whole batch per step."""
    if _is_shared(prompts):  # n samples of one prompt: prefill it once, copy its keys/values into every row
        cache, logits = _prefill(model, prompts[:1], budget, device)
        cache, logits = cache.repeat(len(prompts)), logits.expand(len(prompts), -1)
    else:
        cache, logits = _prefill(model, prompts, budget, device)
    return _one_forward(model, cache), logits


def _one_forward(model, cache: KVCache):
    def forward(tokens, active, _previous):
        # stopped rows still ride along in the batch but do not advance their cache
        return model(tokens[:, None], cache=cache, num_new=active.long())[:, 0]

    return forward


def _invariant_batched(model, prompts, budget, device):
    """Each distinct prompt prefilled alone (a batched prefill would round differently), then one batched
    forward per step, whose rows are batch-invariant (QwenForCausalLM.use_invariant_linear)."""
    if _is_shared(prompts):
        return _batched(model, prompts, budget, device)
    caches, rows = zip(*(_prefill(model, [p], budget, device) for p in prompts))
    return _one_forward(model, KVCache.stack(caches)), torch.cat(rows)


def _rowwise(model, prompts, budget, device):
    """One forward per active row per step, each with its own one-row cache: the arithmetic of the row alone."""
    if _is_shared(prompts):
        first, logits = _prefill(model, prompts[:1], budget, device)
        caches = [first] + [first.repeat(1) for _ in prompts[1:]]
        logits = logits.expand(len(prompts), -1)
    else:
        caches, rows = zip(*(_prefill(model, [p], budget, device) for p in prompts))
        logits = torch.cat(rows)

    def forward(tokens, active, previous):
        rows = [model(tokens[b : b + 1, None], cache=caches[b])[:, 0] if on else previous[b : b + 1]
                for b, on in enumerate(active.tolist())]  # a stopped row keeps its old (unused) logits
        return torch.cat(rows)

    return forward, logits


def generate_ids(
    model: QwenForCausalLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int | Sequence[int],
    *,
    choose: Chooser = greedy,
    stop_ids: Sequence[int] = (),
    batch_invariant: bool = False,
) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in prompts]
    for step in decode(model, prompts, max_new_tokens, choose=choose, stop_ids=stop_ids,
                       batch_invariant=batch_invariant):
        for row, t in enumerate(step.tokens):
            if t is not None:
                out[row].append(t)
    return out


class SamplingChooser:
    """The decode loop's chooser for real requests: per-row sampler state, optional JSON-mode constraints
    (stage 0) and optional logprobs. Only active rows advance their sampler state and constraint."""

    def __init__(self, states: Sequence, constraints: Sequence | None = None, logprobs: int | None = None):
        self.states = list(states)
        self.constraints = list(constraints) if constraints is not None else [None] * len(self.states)
        self.logprobs = logprobs
        self.last_logprobs: list | None = None

    def __call__(self, logits: torch.Tensor, active: torch.Tensor, step: int) -> torch.Tensor:
        allowed = None
        if any(c is not None for c in self.constraints):
            allowed = batch_allowed(self.constraints, logits.shape[-1])
            allowed[~active.cpu()] = True  # a stopped row draws a throwaway token; never an all-masked row
            allowed = allowed.to(logits.device)
        tokens, info = sample(logits, self.states, allowed=allowed, logprobs=self.logprobs)
        self.last_logprobs = info
        for row, (token, is_active) in enumerate(zip(tokens.tolist(), active.tolist())):
            if is_active:
                self.states[row].accept(token)
                if self.constraints[row] is not None:
                    self.constraints[row].advance(token)
        return tokens
