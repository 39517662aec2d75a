"""A follower rank that load(..., tp=N) starts: `python -m qwen_ref.parallel.follower '<load's arguments as JSON>'`
with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set, as torchrun sets them. load() serves rank 0 and exits."""

from __future__ import annotations

import json
import sys

from qwen_ref.qwen import load

if __name__ == "__main__":
    load(**json.loads(sys.argv[1]))
    raise AssertionError("a follower's load() returns only by exiting")
