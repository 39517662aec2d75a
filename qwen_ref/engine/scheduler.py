"""Who runs next: admission by memory and batch size, and which prefill chunks fill a step.

Admission reserves for each request the KV memory it can need at most (prompt + max_tokens positions); the
memory itself is allocated as the request uses it. A request that can never fit the budget is refused at once
with KVMemoryExceeded; one that does not fit now waits, first come first served. n samples of one prompt are
admitted together. Prompts are prefilled shortest remaining prompt first, so a short prompt is not queued behind
a long one; the engine decides how much prefill work a step does.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable

import torch

from qwen_ref.engine.sequence import Sequence, Status
from qwen_ref.errors import KVMemoryExceeded
from qwen_ref.models.kv_cache import bytes_per_token
from qwen_ref.models.qwen2 import QwenForCausalLM

KV_MEMORY_SHARE = 0.5  # of the device's available memory, when no budget is given


def default_kv_memory(device: torch.device) -> int:
    """Half the memory available on the device now (CUDA: free memory; CPU: MemAvailable)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * KV_MEMORY_SHARE)
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        return int(kib * 1024 * KV_MEMORY_SHARE)
    except (OSError, StopIteration, ValueError):
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * KV_MEMORY_SHARE)


class Scheduler:
    def __init__(self, model: QwenForCausalLM, *, max_running: int, kv_memory: int):
        self.per_token = bytes_per_token(model.config, model.lm_head.weight.dtype)
        self.max_running = max_running
        self.kv_memory = kv_memory
        self.reserved = 0
        self.waiting: deque[list[Sequence]] = deque()  # groups: one request, or n samples of one prompt
        self.running: list[Sequence] = []

    def need(self, seq: Sequence) -> int:
        return seq.max_length * self.per_token

    def check_fits(self, group: list[Sequence]) -> None:
        """KVMemoryExceeded if the group could not run even alone."""
        need = sum(self.need(s) for s in group)
        if need > self.kv_memory:
            seq = group[0]
            raise KVMemoryExceeded(
                f"the request needs up to {need / 2**20:.1f} MiB of KV cache ({len(group)} x "
                f"({len(seq.request.prompt_ids)} prompt + {seq.request.max_tokens} max_tokens) positions x "
                f"{self.per_token} bytes), more than the engine's budget of {self.kv_memory / 2**20:.1f} MiB; "
                "lower max_tokens or n, or raise the budget (kv_memory, serve --kv-memory)")

    def admit(self) -> None:
        """Move waiting groups into the running set while memory and batch size allow, in arrival order."""
        while self.waiting:
            group = self.waiting[0]
            need = sum(self.need(s) for s in group)
            room = len(self.running) + len(group) <= self.max_running or not self.running
            if not room or (self.reserved + need > self.kv_memory and self.running):
                return
            self.waiting.popleft()
            self.reserved += need
            for i, seq in enumerate(group):
                seq.reserved = self.need(seq)
                seq.status = Status.PREFILL if i == 0 else Status.FOLLOW
                self.running.append(seq)

    def prefill_chunks(self, chunk_of: Callable[[Sequence], int], budget: int) -> list[Sequence]:
        """The sequences whose next chunk runs this step: shortest remaining prompt first, as many chunks as fit
        in `budget` tokens, and always at least one (budget 0: all of them, in that order)."""
        prefilling = sorted((s for s in self.running if s.status is Status.PREFILL),
                            key=lambda s: (s.remaining_prompt, s.arrival))
        if budget == 0:
            return prefilling
        chosen = []
        for seq in prefilling:
            n = chunk_of(seq)
            if n <= budget or not chosen:
                chosen.append(seq)
                budget -= n
        return chosen

    def release(self, seqs: Iterable[Sequence]) -> None:
        """Take finished, failed or cancelled sequences out; their memory goes back to the budget."""
        gone = {id(s) for s in seqs}
        for seq in self.running:
            if id(seq) in gone:
                self.reserved -= seq.reserved
                seq.reserved = 0
                seq.cache = None
                seq.status = Status.DONE
        self.running = [s for s in self.running if id(s) not in gone]
