"""One request inside the engine: what it asks for, where it is, and the events it produces.

A request's events go to its sink in order: Prompt (only with prompt_logprobs), Token per generated token, then
exactly one of Finished (stop or length; the stop token itself is the last Token) or Failed (its own typed error;
no other request is touched).
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from qwen_ref.errors import QwenRefError
from qwen_ref.models.kv_cache import KVCache
from qwen_ref.sampling import ForcedLogprobs, RequestState, TokenLogprobs


@dataclass
class EngineRequest:
    """What the engine runs: token ids in, a budget, the sampler's state, and optional per-request parts."""

    prompt_ids: list[int]
    max_tokens: int
    state: RequestState  # parameters, seed, step and penalty history of the sampler
    stop_ids: frozenset[int]
    constraint: Any = None  # qwen_ref.sampling.json_mask.JsonConstraint (JSON mode): stage 0 of the sampler
    adapter: Any = None  # qwen_ref.lora.LoraAdapter, applied unmerged to this request's rows
    logprobs: int | None = None  # alternatives to report per token (the logprobs extension)
    deadline: float | None = None  # time.monotonic() after which the request fails with RequestTimeout
    prompt_logprobs: int | None = None  # alternatives per prompt token: the prompt is scored (echo with logprobs)


@dataclass(frozen=True)
class Token:
    token: int
    logprobs: TokenLogprobs | None = None


@dataclass(frozen=True)
class Prompt:
    """With prompt_logprobs: each prompt token after the first, scored by the logits before it; sent once the
    prompt is in the cache, before the first Token."""

    logprobs: tuple[ForcedLogprobs, ...]


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop": a stop id was generated; "length": max_tokens were generated


@dataclass(frozen=True)
class Failed:
    error: QwenRefError


Event = Prompt | Token | Finished | Failed
Sink = Callable[[Event], None]


class Status(enum.Enum):
    WAITING = "waiting"  # queued: not admitted yet (memory or batch size)
    PREFILL = "prefill"  # admitted: its prompt goes into its cache chunk by chunk
    FOLLOW = "follow"  # one of n samples: waits for the first sample's prefill, then copies it
    DECODE = "decode"  # one token per step
    DONE = "done"


@dataclass(eq=False)
class Sequence:
    request: EngineRequest
    sink: Sink
    arrival: int
    status: Status = Status.WAITING
    cache: KVCache | None = None
    prefilled: int = 0  # prompt tokens in the cache
    prefill_pass: Any = None  # qwen_ref.models.qwen2.Pass: the chunk whose layers are being run, a few per step
    prompt_infos: list[ForcedLogprobs] = field(default_factory=list)  # with prompt_logprobs, chunk by chunk
    logits: torch.Tensor | None = None  # [V]: the next token's logits, ready to sample
    next_token: int | None = None  # sampled, not yet fed to the model
    produced: int = 0
    reserved: int = 0  # KV bytes admission set aside for it (its prompt + max_tokens)
    followers: list[Sequence] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def remaining_prompt(self) -> int:
        return len(self.request.prompt_ids) - self.prefilled

    @property
    def max_length(self) -> int:
        return len(self.request.prompt_ids) + self.request.max_tokens

    def cancel(self) -> None:
        """Stop this request at the next step boundary (a hang-up, a dropped stream); frees its row and memory."""
        self.cancelled.set()
