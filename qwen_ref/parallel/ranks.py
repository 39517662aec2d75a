"""The processes of load(..., tp=N): joining a process group torchrun started, or starting the followers here.

- Under torchrun (RANK and WORLD_SIZE set, or a process group already initialized) every process calls load();
  rank 0's returns the model, the others' serve rank 0 and exit when it stops.
- Otherwise load() is rank 0 and starts ranks 1..N-1 as `python -m qwen_ref.parallel.follower`, the same load()
  with the torchrun variables set, so both ways run one code path. A follower exits when its parent does.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from qwen_ref.config import QwenConfig
from qwen_ref.models.qwen2 import QwenForCausalLM
from qwen_ref.parallel.driven import command_group, drive, follow
from qwen_ref.parallel.launch import DEFAULT_TIMEOUT_S, backend, free_port
from qwen_ref.parallel.tp import TensorParallelError, check_splits, load_tensor_parallel

PARENT = "QWEN_REF_TP_PARENT"  # set for the followers load() starts: the pid they exit with
_open: list[Ranks] = []  # the ranks this process leads: one tensor-parallel model at a time


@dataclass
class Ranks:
    rank: int
    world: int
    device: torch.device
    commands: Any = None  # the gloo group model calls are sent on (parallel/driven.py)
    followers: list[subprocess.Popen] = field(default_factory=list)
    closed: bool = False
    stop: Any = None  # rank 0: the channel's stop(), which ends the followers' loop
    threads: int = field(default_factory=torch.get_num_threads)  # this process's, restored at close

    def close(self, stopped: bool = False) -> None:
        """Stop the followers (through the channel, once rank 0 drives) and leave the group. stopped: a follower
        that rank 0 told to stop."""
        if self.closed:
            return
        self.closed = True
        try:
            if self.stop is not None:
                stopped = self.stop()
        except Exception:
            pass  # a follower that is already gone: nothing to stop
        if stopped and self.commands is not None:
            # after a stop every rank meets here once before any leaves the group: a rank that tore down its
            # connections while another was still using them aborted that one at exit (1 run in 25 under torchrun)
            with contextlib.suppress(Exception):
                dist.barrier(group=self.commands)
        for p in self.followers:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(self.threads)


def _device(device: torch.device, rank: int) -> torch.device:
    if device.type != "cuda":
        return device
    local = int(os.environ.get("LOCAL_RANK", rank))
    if local >= torch.cuda.device_count():
        raise TensorParallelError(f"tp: rank {rank} needs cuda:{local}, but {torch.cuda.device_count()} GPUs are "
                                  "visible")
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def _threads(world: int, device: torch.device) -> None:
    if device.type == "cpu":  # the ranks share the machine's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))


TIMEOUT_ENV = "QWEN_REF_TP_TIMEOUT_S"  # seconds a forward's collective may wait (default 120); ranks inherit it


def start(world: int, device: torch.device, load_args: dict[str, Any]) -> Ranks:
    """Join or start a process group of `world` ranks; load_args: what the followers this starts pass to load()."""
    try:
        timeout_s = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    except ValueError:
        raise TensorParallelError(f"{TIMEOUT_ENV}={os.environ[TIMEOUT_ENV]!r} is not a number of seconds") from None
    timeout = datetime.timedelta(seconds=timeout_s)
    if any(not r.closed for r in _open):
        raise TensorParallelError("tp: this process already runs a tensor-parallel model; close() it first "
                                  "(one process group per process)")
    if dist.is_initialized() or "WORLD_SIZE" in os.environ:
        have = dist.get_world_size() if dist.is_initialized() else int(os.environ["WORLD_SIZE"])
        if have != world:
            raise TensorParallelError(f"tp={world}, but this process group has {have} ranks (WORLD_SIZE); start "
                                      f"{world} processes, or pass tp={have}")
        if not dist.is_initialized():
            dist.init_process_group(backend(), timeout=timeout)
        rank = dist.get_rank()
        ranks = Ranks(rank, world, _device(device, rank))
        if os.environ.get(PARENT):
            _exit_with_parent(int(os.environ[PARENT]))
    else:
        port = free_port()
        ranks = Ranks(0, world, _device(device, 0))
        ranks.followers = [_start_follower(r, world, port, load_args) for r in range(1, world)]
        try:
            dist.init_process_group(backend(), init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=world,
                                    timeout=timeout)
        except Exception as e:
            gone = [f"rank {r} exited with {p.poll()}" for r, p in enumerate(ranks.followers, 1)
                    if p.poll() is not None]
            ranks.close()
            raise TensorParallelError(f"tp: the {world} ranks did not join ({'; '.join(gone) or e})") from None
        _open.append(ranks)
    _threads(world, ranks.device)
    ranks.commands = command_group()
    return ranks


def _start_follower(rank: int, world: int, port: int, load_args: dict[str, Any]) -> subprocess.Popen:
    env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), PARENT: str(os.getpid())}
    return subprocess.Popen([sys.executable, "-m", "qwen_ref.parallel.follower", json.dumps(load_args)], env=env,
                            stdin=subprocess.DEVNULL)


def _exit_with_parent(parent: int) -> None:
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="qwen-ref-tp-parent").start()


def agree(ranks: Ranks, error: str | None) -> None:
    """Every rank says whether its part loaded; any failure is every rank's TensorParallelError naming it."""
    said: list[Any] = [None] * ranks.world
    dist.all_gather_object(said, error)
    failed = [f"rank {r}: {e}" for r, e in enumerate(said) if e is not None]
    if failed:
        raise TensorParallelError(f"tp: loading failed on {'; '.join(failed)}")


def load_model(path: Path, config: QwenConfig, *, dtype: torch.dtype, device: torch.device, world: int,
               exact: bool, kernels: str, load_args: dict[str, Any]) -> tuple[QwenForCausalLM, Ranks]:
    """Rank 0's driven shard of the model and the ranks behind it. On the other ranks this serves rank 0 and
    exits (SystemExit) when rank 0 stops: code after load() runs on rank 0 only."""
    check_splits(config, world)  # before any process starts (load() checked the kernels for device and dtype)
    ranks = start(world, device, load_args)
    model, error = None, None
    try:
        model = load_tensor_parallel(path, config, dtype=dtype, rank=ranks.rank, world=world,
                                     device=ranks.device, exact=exact, kernels=kernels)
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    try:
        agree(ranks, error)
    except TensorParallelError:
        ranks.close()
        if ranks.rank != 0:
            raise SystemExit(1) from None
        raise
    assert model is not None
    if ranks.rank != 0:
        follow(model, ranks.commands)
        ranks.close(stopped=True)
        raise SystemExit(0)
    model = drive(model, ranks.commands)
    ranks.stop = model.channel.stop  # type: ignore[attr-defined]
    atexit.register(ranks.close)  # the other ranks stop when this process ends, if close() was not called
    return model, ranks
