"""Time to first text with tools offered against the same request without tools, on both routes.

    python benchmarks/bench_ttft_tools.py                          # tiny qwen2.5, 20 rounds
    python benchmarks/bench_ttft_tools.py --source tiny:qwen2.5-0.5b-shape --rounds 10

Starts `python -m qwen_ref.server` on a free loopback port and sends streamed chat requests one at a time,
alternating with and without tools (so both see the same machine state). The first text is the first event
carrying non-empty text: `response` on ai/run, `delta.content` on chat/completions. With tools offered the
prompt is longer (the tools are in it), so some of the difference is prefill; the rest would be text held
back. A third request separates the two: no tools, but a system message as long as the tools' text (the same
prompt length). Prints one JSON line per route: time to first text each way (p50/p90/p99), the ratios at the
median, and the prompt token counts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import httpx
from bench_server import percentiles, start_server

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather now in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city"}},
                   "required": ["city"]}}}]

# a system message about as long, in tokens, as Qwen2.5's template makes the tools above (141 tokens)
PADDING = ("You are a careful assistant. Answer the question you are asked, briefly and kindly, and say so when you "
           "do not know. ") * 6


def first_text(client: httpx.Client, url: str, body: dict[str, Any], openai: bool) -> tuple[float, int]:
    """Seconds to the first non-empty text, and the prompt's token count."""
    start = time.perf_counter()
    first, prompt = None, 0
    with client.stream("POST", url, json={**body, "stream": True, **({"stream_options": {"include_usage": True}}
                                                                    if openai else {})}) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            text = ((event["choices"][0]["delta"].get("content") if event.get("choices") else None) if openai
                    else event.get("response"))
            if text and first is None:
                first = time.perf_counter() - start
            usage = event.get("usage") or {}
            prompt = usage.get("prompt_tokens", prompt)
    return (first if first is not None else float("inf")), prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default="tiny:qwen2.5", help="the model (default: tiny:qwen2.5, which has "
                                                                  "Qwen2.5's tool template)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    proc, base = start_server(args.source, "exact", args.threads, 16)
    try:
        routes = {"ai/run": (f"{base}/ai/run/bench", False), "chat/completions": (f"{base}/v1/chat/completions", True)}
        with httpx.Client(timeout=600) as client:
            for route, (url, openai) in routes.items():
                times: dict[str, list[float]] = {"without": [], "with": [], "same_length": []}
                prompts = {}
                for i in range(args.rounds + 1):
                    for kind in times:
                        ask = {"role": "user", "content": f"Tell me a story {i}"}
                        body: dict[str, Any] = {"messages": [ask], "max_tokens": args.max_tokens, "seed": 1 + i}
                        if openai:
                            body["model"] = "bench"
                        if kind == "with":
                            body["tools"] = TOOLS
                        if kind == "same_length":
                            body["messages"] = [{"role": "system", "content": PADDING}, ask]
                        seconds, prompts[kind] = first_text(client, url, body, openai)
                        if i:  # round 0 warms up
                            times[kind].append(seconds)
                without, with_tools = statistics.median(times["without"]), statistics.median(times["with"])
                same_length = statistics.median(times["same_length"])
                print(json.dumps({"bench": "ttft_tools", "route": route, "source": args.source, "rounds": args.rounds,
                                  "ttft_without_s": percentiles(times["without"]),
                                  "ttft_with_tools_s": percentiles(times["with"]),
                                  "ttft_same_length_no_tools_s": percentiles(times["same_length"]),
                                  "ratio_p50": round(with_tools / without, 3),
                                  "ratio_p50_same_length": round(with_tools / same_length, 3),
                                  "prompt_tokens_without": prompts["without"],
                                  "prompt_tokens_with_tools": prompts["with"],
                                  "prompt_tokens_same_length": prompts["same_length"]}), flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
