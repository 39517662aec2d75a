"""The machine's limits, measured beside what is timed: memory read bandwidth and float32 multiply-add peaks.

These machines share memory with noisy neighbours: the bandwidth a 1 GiB read gets moves by 2x within a minute
(36 to 76 GB/s seen in one run). A roofline fraction is therefore taken per round: each round reads the probe
buffer once, then runs the timed work, and the fraction is that round's bytes/s over that round's probe; the
benchmarks report the median over rounds. `interleaved` runs the rounds, each case in turn.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

# the CPU features that decide which kernels run and how fast (flags as /proc/cpuinfo names them)
FEATURES = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16")


def print_machine(threads: int) -> None:
    """One JSON line naming the machine: figures from different sessions come from different CPUs."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass  # not Linux: the model from platform, no flags
    print(json.dumps({"bench": "machine", "cpu": model, "features": [f for f in FEATURES if f in flags],
                      "threads": threads, "torch": torch.__version__}), flush=True)


class ReadProbe:
    """Reads a buffer of `gib` GiB with a full-thread torch.sum: the bytes/s a plain streaming read gets now."""

    def __init__(self, gib: float = 1.0):
        self.buffer = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
        self.buffer.sum()  # touch every page before the first timing

    def bytes_per_s(self) -> float:
        t = time.perf_counter()
        self.buffer.sum()
        return self.buffer.numel() * 4 / (time.perf_counter() - t)


def blas_peak_flops(n: int = 2048, repeats: int = 3) -> float:
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


_FMA_SOURCE = r"""
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <vector>
#if defined(__AVX512F__)
typedef __m512 V;
inline V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V splat(float x) { return _mm512_set1_ps(x); }
constexpr int LANES = 16;
#else
typedef __m256 V;
inline V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V splat(float x) { return _mm256_set1_ps(x); }
constexpr int LANES = 8;
#endif

int64_t lanes() { return LANES; }

// Every thread runs 16 independent chains of vector multiply-adds (enough to cover the instruction's latency on
// every pipe); a sum of the results is returned so that nothing is optimised away.
double fma_chains(int64_t iters) {
  const int64_t threads = at::get_num_threads();
  std::vector<double> sink(threads, 0.0);
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      V acc[16];
      for (int i = 0; i < 16; ++i) acc[i] = splat(static_cast<float>(i + t));
      const V m = splat(0.999999f), c = splat(1e-6f);
      for (int64_t n = 0; n < iters; ++n) {
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i) acc[i] = fma(acc[i], m, c);
      }
      float out[LANES];
      double s = 0;
      for (int i = 0; i < 16; ++i) {
        std::memcpy(out, &acc[i], sizeof out);
        for (int j = 0; j < LANES; ++j) s += out[j];
      }
      sink[t] = s;
    }
  });
  double s = 0;
  for (double v : sink) s += v;
  return s;
}
"""


def fma_instruction_peak_flops(iters: int = 20_000_000, repeats: int = 3) -> float:
    """float32 FLOP/s of independent vector multiply-adds on every thread, compiled for this CPU (-march=native)
    on first use and cached: the instruction peak, which a BLAS need not reach (MKL's float32 torch.mm got about
    0.4 of it on the AMD Zen 5 machine seen here: 197.5 against 495.1 GFLOP/s on 2 threads)."""
    from torch.utils.cpp_extension import load_inline

    ext = load_inline("qwen_ref_bench_fma_peak", cpp_sources=_FMA_SOURCE, functions=["fma_chains", "lanes"],
                      extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    ext.fma_chains(iters // 10)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        ext.fma_chains(iters)
        best = min(best, time.perf_counter() - t)
    return torch.get_num_threads() * iters * 16 * ext.lanes() * 2 / best


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
