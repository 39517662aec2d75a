"""The machine's limits, measured beside what is timed: memory read bandwidth and float32 multiply-add peak.

These machines share memory with noisy neighbours: the bandwidth a 1 GiB read gets moves by 2x within a minute
(36 to 76 GB/s seen in one run). A roofline fraction is therefore taken per round: each round reads the probe
buffer once, then runs the timed work, and the fraction is that round's bytes/s over that round's probe; the
benchmarks report the median over rounds. `interleaved` runs the rounds, each case in turn.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


class ReadProbe:
    """Reads a buffer of `gib` GiB with a full-thread torch.sum: the bytes/s a plain streaming read gets now."""

    def __init__(self, gib: float = 1.0):
        self.buffer = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
        self.buffer.sum()  # touch every page before the first timing

    def bytes_per_s(self) -> float:
        t = time.perf_counter()
        self.buffer.sum()
        return self.buffer.numel() * 4 / (time.perf_counter() - t)


def fma_peak_flops(n: int = 2048, repeats: int = 3) -> float:
    """float32 FLOP/s of a large square torch.mm (2 n^3 FLOP), best of `repeats`: the multiply-add peak a
    BLAS reaches with this many threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def interleaved(cases: dict[str, Callable[[], float]], rounds: int, probe: ReadProbe | None) -> dict[str, dict]:
    """Each round: for each case, one probe read then the case (which returns the seconds of the work it timed).
    Per case: the median seconds and the median of each round's probe bytes/s (a fraction's denominator), with
    the raw lists. Without a probe (a GPU run) the probe figures are 0."""
    seconds: dict[str, list[float]] = {k: [] for k in cases}
    bandwidth: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for name, case in cases.items():
            bandwidth[name].append(probe.bytes_per_s() if probe is not None else 0.0)
            seconds[name].append(case())
    return {k: {"s": statistics.median(seconds[k]), "probe_bytes_per_s": statistics.median(bandwidth[k]),
                "seconds": seconds[k], "probes": bandwidth[k]} for k in cases}


def roofline_fraction(step_bytes: int, seconds: list[float], probes: list[float]) -> float:
    """Median over rounds of (bytes / seconds) / probe bytes/s: the share of the bandwidth measured in that round."""
    return statistics.median(step_bytes / s / bw for s, bw in zip(seconds, probes))
