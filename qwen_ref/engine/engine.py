"""The engine: continuous batching with chunked prefill, one step at a time.

    engine = Engine(qwen.model)
    handle = engine.add(request, sink)        # thread-safe; sink(event) gets Token, then Finished or Failed
    while engine.has_work(): engine.step()    # or engine.start() to run steps on a thread of its own

A step: take in new requests and drop cancelled or expired ones; admit waiting requests as memory allows; feed
every decoding request its last token in one decode step; prefill (while requests decode, for at most
prefill_ratio x that decode step's time, a decoder layer at a time; else a chunk); sample a token for every
request that has logits; hand the tokens out; release the requests that finished. Requests join and leave
at step boundaries. generate(), the CLI and the server all run their requests through this class.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Sequence as Seq

import torch

from qwen_ref.engine.runner import Runner, decode_mode
from qwen_ref.engine.sampling_step import sample_rows
from qwen_ref.engine.scheduler import Scheduler, default_kv_memory
from qwen_ref.engine.sequence import EngineRequest, Failed, Finished, Prompt, Sequence, Sink, Status, Token
from qwen_ref.errors import ConfigError, EngineError, InvalidInput, QwenRefError, RequestTimeout
from qwen_ref.models.qwen2 import QwenForCausalLM

DEFAULT_PREFILL_CHUNK = 32  # prompt tokens per forward, at fixed offsets of each prompt (docs/engine.md)
DEFAULT_PREFILL_RATIO = 0.5  # while requests decode, prefill time per step <= this x the decode step's time
DEFAULT_MAX_RUNNING = 64


class Engine:
    def __init__(self, model: QwenForCausalLM, *, exact: bool = True, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 prefill_ratio: float = DEFAULT_PREFILL_RATIO, max_running: int = DEFAULT_MAX_RUNNING,
                 kv_memory: int | None = None):
        for name, value in (("prefill_chunk", prefill_chunk), ("max_running", max_running), ("kv_memory", kv_memory)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"Engine: {name}={value!r} must be an integer >= 1")
        if isinstance(prefill_ratio, bool) or not isinstance(prefill_ratio, int | float) or not prefill_ratio > 0:
            raise ConfigError(f"Engine: prefill_ratio={prefill_ratio!r} must be a number > 0")
        self.prefill_ratio = float(prefill_ratio)
        device = model.lm_head.weight.device
        self.runner = Runner(model, mode=decode_mode(model, exact), prefill_chunk=prefill_chunk)
        self.scheduler = Scheduler(model, max_running=max_running,
                                   kv_memory=default_kv_memory(device) if kv_memory is None else kv_memory)
        self._inbox: list[list[Sequence]] = []
        self._lock = threading.Condition()
        self._arrivals = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.counters = {"steps": 0, "tokens": 0, "requests": 0, "failed": 0}

    @property
    def mode(self) -> str:
        return self.runner.mode

    def add(self, request: EngineRequest, sink: Sink, samples: Seq[tuple[EngineRequest, Sink]] = ()) -> Sequence:
        """Queue a request (plus any further samples of the same prompt, which share its prefill). Raises
        KVMemoryExceeded at once when it could never fit. Returns the handle whose cancel() stops it."""
        group = [Sequence(r, s, next(self._arrivals)) for r, s in [(request, sink), *samples]]
        assert all(g.request.prompt_ids == group[0].request.prompt_ids for g in group), "samples share a prompt"
        if not request.prompt_ids:
            raise InvalidInput("/prompt_ids", "minItems", "a request needs at least one prompt token")
        self.scheduler.check_fits(group)
        group[0].followers = group[1:]
        with self._lock:
            if self._closed:
                raise EngineError("the engine is shut down")
            self._inbox.append(group)
            self.counters["requests"] += len(group)
            self._lock.notify()
        return group[0]

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._inbox or self.scheduler.waiting or self.scheduler.running)

    def stats(self) -> dict[str, int]:
        queued = len(self._inbox) + sum(len(group) for group in self.scheduler.waiting)
        return {**self.counters, "active": len(self.scheduler.running), "queued": queued,
                "kv_reserved_bytes": self.scheduler.reserved, "kv_budget_bytes": self.scheduler.kv_memory}

    # ------------------------------------------------------------------------------------------------ one step

    def step(self) -> None:
        with self._lock:
            self.scheduler.waiting.extend(self._inbox)
            self._inbox.clear()
        self._drop_stopped()
        self.scheduler.admit()
        decoding = [s for s in self.scheduler.running if s.status is Status.DECODE]
        ready = []
        started = time.perf_counter()
        for seq, logits in zip(decoding, self.runner.decode(decoding) if decoding else []):
            if isinstance(logits, QwenRefError):
                self._fail(seq, logits)
            else:
                seq.logits = logits
                ready.append(seq)
        # while requests decode, prefill gets a share of the step's time, a decoder layer at a time; else a chunk
        budget = (time.perf_counter() - started) * self.prefill_ratio if decoding else None
        ready += self._prefill(budget)
        self._sample(ready)
        self.counters["steps"] += 1

    def _drop_stopped(self) -> None:
        now = time.monotonic()
        waiting = self.scheduler.waiting
        for i in reversed(range(len(waiting))):
            kept = [seq for seq in waiting[i] if not self._stopped(seq, now)]
            if not kept:
                del waiting[i]
            elif len(kept) < len(waiting[i]):
                kept[0].followers, waiting[i] = kept[1:], kept
        for seq in list(self.scheduler.running):
            self._stopped(seq, now)

    def _stopped(self, seq: Sequence, now: float) -> bool:
        if seq.cancelled.is_set():
            self._release(seq)
            return True
        deadline = seq.request.deadline
        if deadline is not None and now > deadline:
            self._fail(seq, RequestTimeout("Timeout: the request ran past its deadline"))
            return True
        return False

    def _prefill(self, budget_s: float | None) -> list[Sequence]:
        """Prefill work for this step: with a time budget, decoder layers of the waiting prompts' chunks (shortest
        remaining prompt first) until the budget is spent, at least one layer; without one, whole chunks up to
        prefill_chunk tokens, at least one chunk."""
        ready: list[Sequence] = []
        if budget_s is None:
            for seq in self.scheduler.prefill_chunks(self.runner.next_chunk, self.runner.prefill_chunk):
                self._prefill_one(seq, None, ready)
            return ready
        started, layer_s = time.perf_counter(), 0.0
        for seq in self.scheduler.prefill_chunks(self.runner.next_chunk, 0):
            while seq.status is Status.PREFILL:
                spent = time.perf_counter() - started
                if spent > 0 and spent + layer_s > budget_s:
                    return ready
                t = time.perf_counter()
                self._prefill_one(seq, 1, ready)
                layer_s = time.perf_counter() - t
        return ready

    def _prefill_one(self, seq: Sequence, layers: int | None, ready: list[Sequence]) -> None:
        try:
            logits = self.runner.prefill(seq, layers)
        except Exception as e:
            for s in [*seq.followers, seq]:
                self._fail(s, e)
            return
        if logits is None:
            return
        group = [seq, *(f for f in seq.followers if f.status is Status.FOLLOW)]
        if seq.request.prompt_logprobs is not None:
            for s in group:
                s.sink(Prompt(tuple(seq.prompt_infos)))
        if seq.request.max_tokens == 0:  # only the prompt was asked for (its logprobs)
            for s in group:
                self._finish(s, "length")
            return
        seq.logits, seq.status = logits, Status.DECODE
        ready.append(seq)
        for follower in group[1:]:  # n samples: each starts from a copy of the prompt's cache
            follower.cache, follower.logits = seq.cache.clone(), logits
            follower.prefilled, follower.status = seq.prefilled, Status.DECODE
            ready.append(follower)

    def _sample(self, ready: list[Sequence]) -> None:
        if not ready:
            return
        logits = _rows([seq.logits for seq in ready])  # [B, V]
        for seq, drawn in zip(ready, sample_rows(ready, logits)):
            seq.logits = None
            if isinstance(drawn, QwenRefError):
                self._fail(seq, drawn)
                continue
            token, info = drawn
            seq.produced += 1
            self.counters["tokens"] += 1
            seq.sink(Token(token, info))
            if token in seq.request.stop_ids:
                self._finish(seq, "stop")
            elif seq.produced >= seq.request.max_tokens:
                self._finish(seq, "length")
            else:
                seq.next_token = token

    def _finish(self, seq: Sequence, reason: str) -> None:
        self._release(seq)
        seq.sink(Finished(reason))

    def _fail(self, seq: Sequence, error: Exception) -> None:
        self._release(seq)
        self.counters["failed"] += 1
        seq.sink(Failed(error if isinstance(error, QwenRefError) else EngineError(f"{type(error).__name__}: {error}")))

    def _release(self, seq: Sequence) -> None:
        waiting = [f for f in seq.followers if f.status is Status.FOLLOW]
        if seq.status is Status.PREFILL and waiting:  # the samples that waited for its prefill do their own
            waiting[0].status, waiting[0].followers = Status.PREFILL, waiting[1:]
        self.scheduler.release([seq])
        seq.status = Status.DONE

    # ------------------------------------------------------------------------------------- a thread of its own

    def start(self) -> None:
        """Run steps on a daemon thread whenever there is work (the server's engine)."""
        with self._lock:
            self._closed = False
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="qwen-ref-engine", daemon=True)
                self._thread.start()

    def close(self) -> None:
        """Stop the thread; requests still queued or running fail with EngineError."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        with self._lock:
            groups = [*self._inbox, *self.scheduler.waiting, [s for s in self.scheduler.running]]
            self._inbox.clear()
        for seq in (s for g in groups for s in g):
            self._fail(seq, EngineError("the server is shutting down"))
        self.scheduler.waiting.clear()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not (self._inbox or self.scheduler.waiting or self.scheduler.running):
                    self._lock.wait()
                if self._closed:
                    return
            try:
                self.step()
            except Exception as e:  # a bug in the step itself: its requests fail, the engine goes on
                for seq in list(self.scheduler.running):
                    self._fail(seq, EngineError(f"internal error in the engine: {type(e).__name__}: {e}"))


def _rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """The rows [V] as one tensor [B, V]: a view when they already are consecutive rows of one tensor (a decode
    step's logits), else a copy (32 rows of Qwen2's vocabulary: 10-20 MB a step, freshly allocated)."""
    first = rows[0]
    n = first.numel()
    consecutive = first.dim() == 1 and all(
        r.shape == first.shape and r.dtype == first.dtype and r.is_contiguous()
        and r.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        and r.storage_offset() == first.storage_offset() + i * n for i, r in enumerate(rows))
    return first.as_strided((len(rows), n), (n, 1)) if consecutive else torch.stack(rows)
