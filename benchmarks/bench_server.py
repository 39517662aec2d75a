"""Load on the local server: N concurrent streaming clients vs. the same requests run one after another
through generate() in this process.

    python benchmarks/bench_server.py                              # tiny model, 1/4/16/64 clients, exact batching
    python benchmarks/bench_server.py --clients 8 --batching exact,fast --max-tokens 64
    python benchmarks/bench_server.py --baseline-tree /tmp/before  # also the server of another checkout

--baseline-tree runs the same load against the server of another checkout (e.g. a `git worktree` of an earlier
commit) in the same run, so the two are compared on the same machine at the same time.

Starts `python -m qwen_ref.server` on a free loopback port per batching mode. Each client sends its share of
the requests one after another (a closed loop), streaming, and times the first text and the whole answer.
Prints one JSON line per run: throughput in completion tokens per second and p50/p90/p99 latencies in
seconds; server runs also count how many answers equal generate()'s for the same request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

import httpx
import torch

import qwen_ref
from qwen_ref.workers_ai.generate import generate


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 4)

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99)}


def bodies(count: int, max_tokens: int) -> list[dict[str, Any]]:
    return [{"messages": [{"role": "user", "content": f"Tell me about topic {i}"}], "max_tokens": max_tokens,
             "seed": 1 + i, "temperature": 0.8} for i in range(count)]


def start_server(source: str, batching: str, threads: int, max_batch: int,
                 tree: str | None = None) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "qwen_ref.server", "--name", f"bench={source}", "--port", str(port),
           "--batching", batching, "--threads", str(threads), "--max-batch", str(max_batch)]
    env = {**os.environ, "QWEN_REF_API_TOKEN": ""}
    if tree is not None:
        env["PYTHONPATH"] = tree
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, cwd=tree)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}/v1/models", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not come up")


async def one_request(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    first = None
    text: list[str] = []
    usage: dict[str, int] = {}
    async with client.stream("POST", url, json={**body, "stream": True}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if event.get("response") and first is None:
                first = time.perf_counter() - start
            text.append(event.get("response", ""))
            usage = event.get("usage", usage)
    total = time.perf_counter() - start
    return {"latency": total, "ttft": first if first is not None else total, "text": "".join(text),
            "tokens": usage.get("completion_tokens", 0)}


async def load(base: str, work: list[dict[str, Any]], clients: int) -> tuple[list[dict[str, Any]], float]:
    url = f"{base}/ai/run/bench"
    results: list[dict[str, Any]] = [{} for _ in work]
    shares = [list(range(c, len(work), clients)) for c in range(clients)]

    async def client(indices: list[int], http: httpx.AsyncClient) -> None:
        for i in indices:
            results[i] = await one_request(http, url, work[i])

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(share, http) for share in shares))
        wall = time.perf_counter() - start
    return results, wall


def sequential(qwen: qwen_ref.Qwen, work: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], float]:
    results = []
    start = time.perf_counter()
    for body in work:
        t = time.perf_counter()
        out = generate(qwen, body)
        results.append({"latency": time.perf_counter() - t, "text": out["response"],
                        "tokens": out["usage"]["completion_tokens"]})
    return results, time.perf_counter() - start


def summary(kind: str, results: list[dict[str, Any]], wall: float, **extra: Any) -> dict[str, Any]:
    tokens = sum(r["tokens"] for r in results)
    line = {"bench": kind, **extra, "requests": len(results), "completion_tokens": tokens, "wall_s": round(wall, 3),
            "throughput_tok_s": round(tokens / wall, 2), "latency_s": percentiles([r["latency"] for r in results])}
    if "ttft" in results[0]:
        line["ttft_s"] = percentiles([r["ttft"] for r in results])
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default="tiny", help="the model (default: the embedded tiny model)")
    parser.add_argument("--clients", default="1,4,16,64", help="comma-separated concurrent client counts")
    parser.add_argument("--requests", type=int, default=64, help="requests per run (default 64)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--batching", default="exact", help="comma-separated: exact, fast")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, here and in the server")
    parser.add_argument("--baseline-tree", default=None, help="also measure the server of this checkout")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    counts = [int(c) for c in args.clients.split(",")]
    work = bodies(args.requests, args.max_tokens)
    common = {"model": args.source, "max_tokens": args.max_tokens, "threads": args.threads}

    qwen = qwen_ref.load(args.source)
    generate(qwen, {**work[0], "max_tokens": 2})  # warm-up
    alone, wall = sequential(qwen, work)
    print(json.dumps(summary("sequential_generate", alone, wall, **common)), flush=True)

    trees = [("this", None)] + ([("baseline", args.baseline_tree)] if args.baseline_tree else [])
    for batching in args.batching.split(","):
        for clients in counts:  # the two servers alternate per client count: the same machine state for both
            for label, tree in trees:
                proc, base = start_server(args.source, batching, args.threads, max(counts), tree)
                try:
                    asyncio.run(load(base, work[:2], 2))  # warm-up
                    results, wall = asyncio.run(load(base, work, clients))
                finally:
                    proc.terminate()
                    proc.wait(timeout=30)
                same = sum(r["text"] == a["text"] for r, a in zip(results, alone))
                print(json.dumps(summary("server", results, wall, **common, code=label, batching=batching,
                                         clients=clients, same_as_generate=f"{same}/{len(work)}")), flush=True)


if __name__ == "__main__":
    main()
