"""Starting N ranks of a function with torch.distributed: gloo on CPUs, NCCL on GPUs, the same code.

Every collective has a timeout, so a rank that dies or a world that never assembles is an error, not a hang.
"""

from __future__ import annotations

import datetime
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEFAULT_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _rank_main(rank: int, fn: Callable[..., Any], world: int, port: int, timeout_s: float, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(backend(), init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        fn(rank, world, *args)
    except Exception as e:
        raise RuntimeError(f"rank {rank} of {world}: {type(e).__name__}: {e}") from e
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., Any], world: int, *args: Any, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Run fn(rank, world, *args) in `world` new processes joined in one process group. A rank that fails ends
    the run (the others stop at their next collective, within timeout_s) with a TensorParallelError naming it."""
    from qwen_ref.parallel.tp import TensorParallelError

    try:
        mp.spawn(_rank_main, args=(fn, world, free_port(), timeout_s, args), nprocs=world, join=True)
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        lines = [line for line in str(e).splitlines() if line.startswith("RuntimeError: rank ")]
        raise TensorParallelError(f"tensor-parallel run failed: {lines[-1] if lines else str(e).strip()}") from None
