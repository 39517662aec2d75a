"""The engine's model calls: prefill chunks and decode steps, in the one place that picks how rows share a forward.

Decode modes, chosen once per engine (`decode_mode`):
- "exact": each row runs its own forward, the arithmetic of the request alone (a BLAS matmul over many rows
  may round differently from the same matmul over one row).
- "invariant": the model's linears are batch-invariant (decode_linear="invariant"): all rows share one forward
  per step and each row still computes exactly what it computes alone.
- "fast": all rows share one forward with BLAS linears: equal to running alone up to float rounding.
Prefill is always one request per forward, in chunks of `prefill_chunk` tokens at fixed offsets of its prompt,
so a request's numbers never depend on what else runs; a chunk may be run a few decoder layers at a time.
Each row attends over exactly its own keys (RowCaches).

A forward that raises fails only its rows: a shared decode forward that raises is retried row by row, and only
the rows that fail alone fail.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from qwen_ref import lora
from qwen_ref.engine.sequence import Sequence
from qwen_ref.errors import EngineError, QwenRefError
from qwen_ref.models.kv_cache import RowCaches
from qwen_ref.models.qwen2 import QwenForCausalLM
from qwen_ref.sampling import forced_logprobs

DECODE_MODES = ("exact", "invariant", "fast")
MIN_CAPACITY = 64  # positions a new cache starts with; it doubles as it fills, never past the request's maximum


def decode_mode(model: QwenForCausalLM, exact: bool) -> str:
    if not exact:
        return "fast"
    return "invariant" if model.backends.batch_invariant else "exact"


def as_error(e: Exception) -> QwenRefError:
    """A typed error for a failure inside the engine (a typed error passes through)."""
    if isinstance(e, QwenRefError):
        return e
    return EngineError(f"internal error in the engine: {type(e).__name__}: {e}")


class Runner:
    def __init__(self, model: QwenForCausalLM, *, mode: str, prefill_chunk: int):
        assert mode in DECODE_MODES, mode
        self.model = model
        self.mode = mode
        self.prefill_chunk = prefill_chunk
        weight = model.lm_head.weight
        self.device, self.dtype = weight.device, weight.dtype

    def next_chunk(self, seq: Sequence) -> int:
        """Tokens of seq's next prefill chunk: chunks start at multiples of prefill_chunk in its prompt."""
        return min(self.prefill_chunk - seq.prefilled % self.prefill_chunk, seq.remaining_prompt)

    @torch.inference_mode()
    def prefill(self, seq: Sequence, layers: int | None = None) -> torch.Tensor | None:
        """Run `layers` more decoder layers of seq's current chunk (all that are left by default), starting the
        chunk when none is in progress; the logits [V] of its last prompt token once the whole prompt is in.
        A chunk run a few layers at a time gives the numbers of running it at once."""
        if seq.prefill_pass is None:
            n = self.next_chunk(seq)
            start = seq.prefilled
            self._make_room(seq, start + n)
            ids = torch.tensor([seq.request.prompt_ids[start : start + n]], device=self.device)  # [1, n]
            seq.prefill_pass = self.model.begin(ids, cache=seq.cache, lora=self._lora([seq]))
        p = seq.prefill_pass
        if not self.model.run_layers(p, layers):
            return None
        seq.prefill_pass = None
        start, n = seq.prefilled, p.x.shape[1]
        seq.prefilled += n
        last = seq.remaining_prompt == 0
        if seq.request.prompt_logprobs is None:
            out = self.model.end(p, last_only=True, compute_logits=last)
            return out[0, 0] if last else None
        # scoring the prompt: every position's logits, from the chunk's own lm_head product (as `qwen-ref score`
        # computes them); the next token's logits are still the last-only product a request without it uses
        hidden = self.model.final_hidden(p)
        targets = seq.request.prompt_ids[start + 1 : start + n + 1]  # the token each position predicts
        rows = self.model.logits(p, hidden)[0, : len(targets)]  # [n, V] -> [targets, V]
        seq.prompt_infos += forced_logprobs(rows, targets, seq.request.prompt_logprobs)
        return self.model.logits(p, hidden, last_only=True)[0, 0] if last else None

    @torch.inference_mode()
    def decode(self, seqs: Seq[Sequence]) -> list[torch.Tensor | QwenRefError]:
        """Feed each sequence its next token; per sequence its next logits [V], or the error it failed with."""
        for seq in seqs:
            self._make_room(seq, int(seq.cache.lengths[0]) + 1)
        if self.mode == "exact" or len(seqs) == 1:
            return [self._decode_alone(seq) for seq in seqs]
        try:
            tokens = torch.tensor([[seq.next_token] for seq in seqs], device=self.device)  # [B, 1]
            caches = RowCaches([s.cache for s in seqs], self.model.backends.write_rows)
            logits = self.model(tokens, cache=caches, lora=self._lora(seqs))[:, 0]
            return list(logits)
        except Exception:
            # a write that happened before the failure is at the same positions a retry writes, and no length
            # advanced (the cache advances after the whole forward): each row can run again alone
            return [self._decode_alone(seq) for seq in seqs]

    def _decode_alone(self, seq: Sequence) -> torch.Tensor | QwenRefError:
        try:
            tokens = torch.tensor([[seq.next_token]], device=self.device)  # [1, 1]
            return self.model(tokens, cache=seq.cache, lora=self._lora([seq]))[0, 0]
        except Exception as e:
            return as_error(e)

    def _lora(self, seqs: Seq[Sequence]) -> lora.RowAdapters | None:
        adapters = [seq.request.adapter for seq in seqs]
        if all(a is None for a in adapters):
            return None
        return lora.RowAdapters(self.model, adapters, per_row=self.mode != "fast")

    def _make_room(self, seq: Sequence, length: int) -> None:
        """seq's cache holds at least `length` positions: it grows by doubling, capped at the request's maximum."""
        if seq.cache is None:
            capacity = min(max(MIN_CAPACITY, length), seq.max_length)
            seq.cache = self.model.new_cache(1, capacity)
        elif length > seq.cache.capacity:
            seq.cache.grow(min(max(2 * seq.cache.capacity, length), seq.max_length))

