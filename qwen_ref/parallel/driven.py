"""Rank 0 drives, the other ranks follow: the engine, the sampler and the contract run once, on rank 0.

Rank 0's model is its shard of the tensor-parallel model, with every model call first broadcast to the other
ranks (`Channel`), which run the same call on their shards (`follow`), so the collectives inside the forward
meet. The calls are those the engine makes: a forward, or a prefill chunk run a few layers at a time (begin,
run_layers, final_hidden, logits). Rank 0's KV caches are `MirroredCache`s: creating, growing, cloning or
dropping one does the same to the other ranks' cache of the same id, and every forward then writes the same
positions on every rank, so the lengths agree without being sent.

Commands go over a gloo group of their own with no practical timeout (a follower waits for the next request as
long as the server is idle); the forward's collectives keep the process group's timeout. A call that raises
raises on every rank alike (the same state, the same command), so the followers carry on. A call that fails
otherwise (a collective that times out, a rank that fails alone or is gone) may leave the ranks out of step: the
followers stop at their collective's timeout, and rank 0 makes that call and every later one a
TensorParallelError.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import itertools
import logging
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from qwen_ref.errors import QwenRefError
from qwen_ref.models.kv_cache import KVCache, RowCaches
from qwen_ref.models.qwen2 import Pass, QwenForCausalLM
from qwen_ref.parallel.tp import TensorParallelError

log = logging.getLogger(__name__)
COMMAND_TIMEOUT = datetime.timedelta(days=365)  # an idle server's followers wait this long for a request


def command_group() -> Any:
    """The group commands travel on; every rank calls this once, in the same order."""
    return dist.new_group(backend="gloo", timeout=COMMAND_TIMEOUT)


class Channel:
    """Rank 0's end: sends one command at a time, with the ids of the caches and passes it dropped since."""

    def __init__(self, group: Any):
        self.group = group
        self.lock = threading.RLock()  # a command and the local work it starts are one unit: one thread at a time
        self.depth = 0  # calls in progress on the thread holding the lock: only the outermost one is sent
        self.dropped: collections.deque[tuple[str, int]] = collections.deque()  # appended from finalizers
        self.ids = itertools.count(1)
        self.broken: str | None = None

    @contextlib.contextmanager
    def call(self, *command: Any) -> Iterator[bool]:
        """Hold the channel for one model call; send `command` (if any) when the call is the outermost one.
        Yields whether it is: a call inside another (forward's begin) runs on the followers inside theirs."""
        with self.lock:
            outermost = self.depth == 0
            if outermost and command:
                self.send(*command)
            self.depth += 1
            try:
                yield outermost
            except (QwenRefError, IndexError):
                raise  # the checks that run on every rank alike before any collective (cache room, token ids)
            except Exception as e:
                # a collective that failed or timed out, or a failure of this rank alone (memory, say): the
                # followers may be waiting in a collective this rank never reached, out of step for good
                self.broken = f"{type(e).__name__}: {e}"
                raise TensorParallelError(f"the tensor-parallel group is broken: {self.broken}") from None
            finally:
                self.depth -= 1

    def send(self, *command: Any) -> None:
        if self.broken is not None:
            raise TensorParallelError(f"the tensor-parallel group is broken: {self.broken}")
        dropped = []
        while self.dropped:
            dropped.append(self.dropped.popleft())
        try:
            dist.broadcast_object_list([(dropped, command)], src=0, group=self.group)
        except Exception as e:
            self.broken = f"{type(e).__name__}: {e}"
            raise TensorParallelError(f"a rank of the tensor-parallel group is gone ({self.broken})") from None

    def track(self, obj: object, kind: str, i: int | None = None) -> int:
        """obj's id (a new one unless given); the followers drop theirs once obj is garbage."""
        i = next(self.ids) if i is None else i
        weakref.finalize(obj, self.dropped.append, (kind, i))
        return i

    def stop(self) -> bool:
        """Tell the followers to stop; True when they were told (the channel was working)."""
        with self.lock:
            if self.broken is None:
                self.send("stop")
                self.broken = "stopped"
                return True
            return False


class MirroredCache(KVCache):
    channel: Channel
    tp_id: int

    def grow(self, capacity: int) -> None:
        if capacity <= self.capacity:
            return
        with self.channel.call():
            super().grow(capacity)
            self.channel.send("grow", self.tp_id, capacity)

    def clone(self) -> MirroredCache:
        with self.channel.call():
            out = super().clone()
            out.channel, out.tp_id = self.channel, self.channel.track(out, "cache")
            self.channel.send("clone", out.tp_id, self.tp_id)
            return out


def _cache_ref(cache: KVCache | RowCaches | None) -> Any:
    if cache is None:
        return None
    if isinstance(cache, RowCaches):
        return [_cache_ref(c) for c in cache.caches]
    assert isinstance(cache, MirroredCache), "a tensor-parallel model's caches come from its new_cache()"
    return cache.tp_id


def _ints(t: torch.Tensor | None) -> list | None:
    return None if t is None else t.tolist()


class DrivenModel(QwenForCausalLM):
    """Put in front of rank 0's tensor-parallel model class (drive()): each call is sent, then run here (cache
    bookkeeping, which has no collective, runs here first, so that one that fails is never sent)."""

    channel: Channel

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        with self.channel.call():
            cache = super().new_cache(batch_size, capacity)
            cache.__class__ = MirroredCache
            cache.channel, cache.tp_id = self.channel, self.channel.track(cache, "cache")
            self.channel.send("cache", batch_size, capacity, cache.tp_id)
            return cache

    def forward(self, input_ids: torch.Tensor, cache: KVCache | RowCaches | None = None,
                num_new: torch.Tensor | None = None, last_only: bool = False, lora: Any = None,
                compute_logits: bool = True) -> torch.Tensor | None:
        assert lora is None, "a tensor-parallel model takes no adapters"
        with self.channel.call("forward", input_ids.tolist(), _cache_ref(cache), _ints(num_new), last_only,
                               compute_logits):
            return super().forward(input_ids, cache, num_new, last_only, None, compute_logits)

    def begin(self, input_ids: torch.Tensor, cache: KVCache | RowCaches | None = None,
              num_new: torch.Tensor | None = None, lora: Any = None) -> Pass:
        assert lora is None, "a tensor-parallel model takes no adapters"
        with self.channel.call() as outermost:
            if outermost:  # the embedding's all-reduce is a collective: the followers start it too
                i = next(self.channel.ids)
                self.channel.send("begin", i, input_ids.tolist(), _cache_ref(cache), _ints(num_new))
            p = super().begin(input_ids, cache, num_new)
            if outermost:
                p.tp_id = self.channel.track(p, "pass", i)  # type: ignore[attr-defined]
            return p

    def run_layers(self, p: Pass, count: int | None = None) -> bool:
        with self.channel.call("layers", getattr(p, "tp_id", None), count):
            return super().run_layers(p, count)

    def final_hidden(self, p: Pass) -> torch.Tensor:
        with self.channel.call("final", getattr(p, "tp_id", None)):
            p.tp_hidden = super().final_hidden(p)  # type: ignore[attr-defined]
            return p.tp_hidden

    def logits(self, p: Pass, hidden: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        assert hidden is getattr(p, "tp_hidden", None), "logits() of the pass's own final_hidden()"
        with self.channel.call("logits", getattr(p, "tp_id", None), last_only):
            return super().logits(p, hidden, last_only)


def drive(model: QwenForCausalLM, group: Any) -> QwenForCausalLM:
    """Make rank 0's model send each call to the followers before running it."""
    model.__class__ = type(f"Driven{type(model).__name__}", (DrivenModel, type(model)), {})
    model.channel = Channel(group)
    return model


@torch.inference_mode()
def follow(model: QwenForCausalLM, group: Any) -> None:
    """A follower rank: run rank 0's commands on this rank's shard until it says stop."""
    caches: dict[int, KVCache] = {}
    passes: dict[int, Pass] = {}
    device = model.lm_head.weight.device

    def cache(ref: Any) -> KVCache | RowCaches | None:
        if ref is None:
            return None
        return RowCaches([caches[i] for i in ref]) if isinstance(ref, list) else caches[ref]

    def tensor(values: list | None) -> torch.Tensor | None:
        return None if values is None else torch.tensor(values, device=device)

    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=group)
        dropped, (op, *args) = box[0]
        for kind, i in dropped:
            (caches if kind == "cache" else passes).pop(i, None)
        if op == "stop":
            return
        try:
            if op == "cache":
                batch_size, capacity, i = args
                caches[i] = model.new_cache(batch_size, capacity)
            elif op == "grow":
                caches[args[0]].grow(args[1])
            elif op == "clone":
                caches[args[0]] = caches[args[1]].clone()
            elif op == "forward":
                ids, ref, num_new, last_only, compute_logits = args
                model(tensor(ids), cache(ref), tensor(num_new), last_only, None, compute_logits)
            elif op == "begin":
                i, ids, ref, num_new = args
                passes[i] = model.begin(tensor(ids), cache(ref), tensor(num_new))
            elif op == "layers":
                model.run_layers(passes[args[0]], args[1])
            elif op == "final":
                passes[args[0]].tp_hidden = model.final_hidden(passes[args[0]])  # type: ignore[attr-defined]
            elif op == "logits":
                p = passes[args[0]]
                model.logits(p, p.tp_hidden, args[1])  # type: ignore[attr-defined]
            else:
                raise AssertionError(f"unknown command {op!r}")
        except (QwenRefError, IndexError) as e:  # rank 0 ran the same checks on the same state: the same error
            log.debug("tensor-parallel command %s failed as on rank 0: %s", op, e)
        # anything else (a collective that timed out because rank 0 failed alone, say) leaves this rank out of
        # step with rank 0 for good: it propagates, and the follower stops
