"""A small request's latency while hostile requests are in flight, against the same request on an idle server.

    python benchmarks/bench_hostile.py                 # tiny model, 10 rounds
    python benchmarks/bench_hostile.py --rounds 20
    python benchmarks/bench_hostile.py --baseline-tree /tmp/before   # also the server of another checkout

Starts `python -m qwen_ref.server` on a free loopback port. Each round sends the small streamed request alone,
then again while `--hostile` clients each send one of the hostile bodies below in a loop: a prompt of 8 MB
(refused by the character limit), a prompt of 900,000 characters (under the limit, so it is tokenized, and
refused because it cannot fit the window), 200,000 empty messages and 10,000 tools (refused by the counts).
Prints one JSON line: the small request's latency (p50/p90/p99) each way, their ratio at the median, and how
the hostile requests were answered.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections import Counter
from typing import Any

import httpx
from bench_server import percentiles, start_server

HOSTILE: list[Any] = [
    {"prompt": "word " * 1_600_000},  # 8 MB, under the 8 MiB body limit
    {"prompt": "Hello world, this is some text. " * 28_000},  # 900,000 characters
    {"messages": [{"role": "user", "content": ""}] * 200_000},
    {"messages": [{"role": "user", "content": "hi"}], "tools": [{"name": "f"}] * 10_000},
]


def small(client: httpx.Client, url: str) -> float:
    start = time.perf_counter()
    r = client.post(url, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "seed": 1})
    r.raise_for_status()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default="tiny")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--hostile", type=int, default=4, help="concurrent hostile clients (default 4)")
    parser.add_argument("--baseline-tree", default=None, help="also run the server of this checkout (same load)")
    args = parser.parse_args()
    for tree in [None, args.baseline_tree] if args.baseline_tree else [None]:
        run(args, tree)


def run(args: argparse.Namespace, tree: str | None) -> None:
    proc, base = start_server(args.source, "exact", 1, 16, tree)
    url = f"{base}/ai/run/bench"
    bodies = [json.dumps(b).encode() for b in HOSTILE]
    answers: Counter[str] = Counter()
    try:
        with httpx.Client(timeout=600) as client:
            small(client, url)  # warm-up
            alone = [small(client, url) for _ in range(args.rounds)]
            stop = threading.Event()

            def attack(i: int) -> None:
                with httpx.Client(timeout=600) as c:
                    k = i
                    while not stop.is_set():
                        r = c.post(url, content=bodies[k % len(bodies)], headers={"Content-Type": "application/json"})
                        answers[f"{r.status_code}"] += 1
                        k += 1

            threads = [threading.Thread(target=attack, args=(i,)) for i in range(args.hostile)]
            for t in threads:
                t.start()
            time.sleep(1.0)
            busy = [small(client, url) for _ in range(args.rounds)]
            stop.set()
            for t in threads:
                t.join()
        print(json.dumps({"bench": "hostile", "tree": tree or "this", "source": args.source, "rounds": args.rounds,
                          "hostile_clients": args.hostile,
                          "latency_alone_s": percentiles(alone), "latency_under_attack_s": percentiles(busy),
                          "ratio_p50": round(statistics.median(busy) / statistics.median(alone), 3),
                          "hostile_answers": dict(answers)}), flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
