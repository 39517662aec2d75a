"""The generator (Philox4x32-10 keyed by seed and step), the uniform numbers and the seeded draw, against
Random123's known answers and the worked vectors of docs/sampling.md; fresh and per-sample seeds."""

from __future__ import annotations

import math
import re
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
import torch

from qwen_ref.sampling import SEED_MAX, SEED_MIN, RequestState, draw, sample_seed
from qwen_ref.sampling.rng import draw_words, fresh_seed, philox4x32, uniform, words_to_uniform

DOCS = Path(__file__).resolve().parents[1] / "docs" / "sampling.md"

# ----------------------------------------------------------------------------------------------------------
# The generator: Random123 known answers, and the worked vectors of docs/sampling.md

KAT = [  # Random123 tests/kat_vectors, philox4x32 10: counter, key, output
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]

DOC_VECTORS = [  # seed, step, the four output words, u
    (42, 0, (0x9CEAF053, 0x77F5493B, 0x12BF50AD, 0x5742B3D7), 0.4685865183391049),
    (42, 1, (0xFCDB2127, 0x53BA6CFD, 0x838F5A6E, 0x744E06FB), 0.32706338120338474),
    (9_999_999_999, 255, (0x120FBEBA, 0xD9A41ABF, 0x5390AD7C, 0xED2DB711), 0.8501602856140938),
]


@pytest.mark.parametrize(("counter", "key", "expected"), KAT)
def test_philox_known_answers(counter: tuple, key: tuple, expected: tuple) -> None:
    assert philox4x32(counter, key) == expected


@pytest.mark.parametrize(("seed", "step", "words", "u"), DOC_VECTORS)
def test_rng_vectors_match_the_docs(seed: int, step: int, words: tuple, u: float) -> None:
    assert draw_words(seed, step) == words
    assert uniform(seed, step) == u == words_to_uniform(words[0], words[1])
    doc = DOCS.read_text()
    assert " ".join(f"{w:08x}" for w in words) in doc
    assert repr(u) in doc


def test_worked_draw_example_of_the_docs() -> None:
    doc = DOCS.read_text()
    match = re.search(r"probabilities `\[([^\]]*)\]`, seed (\d+), step (\d+) .*?token (\d+)", doc, re.S)
    assert match, "docs/sampling.md lost its worked draw example"
    probs = [float(v) for v in match.group(1).split(",")]
    assert draw(torch.tensor(probs, dtype=torch.float64), int(match.group(2)), int(match.group(3))) == int(
        match.group(4))


def test_rng_rejects_seeds_outside_uint64() -> None:
    for bad in (-1, 2**64, 1.5, True):
        with pytest.raises(ValueError):
            uniform(bad, 0)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------
# The draw and the uniform numbers follow their distributions


def _chi_square_critical(df: int, alpha: float) -> float:
    """Wilson-Hilferty approximation of the upper alpha quantile of chi-square(df)."""
    z = NormalDist().inv_cdf(1 - alpha)
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_seeded_draws_follow_the_distribution() -> None:
    probs = np.array([0.3, 0.2, 0.15, 0.1, 0.08, 0.07, 0.05, 0.03, 0.015, 0.005])
    p = torch.zeros(40, dtype=torch.float64)
    support = [2, 3, 5, 8, 13, 21, 22, 30, 34, 39]
    p[support] = torch.from_numpy(probs)
    tokens = [draw(p, 20240601, step) for step in range(20_000)]
    counts = np.array([tokens.count(t) for t in support])
    assert counts.sum() == 20_000  # no draw outside the support
    # the draws are a fixed function of (seed, step): the statistic is deterministic, alpha only sets the bar
    assert _chi_square(counts, probs) < _chi_square_critical(len(probs) - 1, 1e-4)


def test_uniforms_are_uniform() -> None:
    u = np.array([uniform(7, step) for step in range(20_000)])
    assert u.min() >= 0 and u.max() < 1
    counts = np.bincount((u * 64).astype(int), minlength=64)
    assert _chi_square(counts, np.full(64, 1 / 64)) < _chi_square_critical(63, 1e-4)


# ----------------------------------------------------------------------------------------------------------
# Seeds


def test_unseeded_requests_get_fresh_seeds_in_range() -> None:
    seeds = {RequestState.start({}, []).seed for _ in range(50)} | {fresh_seed() for _ in range(50)}
    assert len(seeds) > 90
    assert all(1 <= s <= 9_999_999_999 for s in seeds)


def test_sample_seeds_count_up_from_the_seed_and_wrap_inside_the_range() -> None:
    assert [sample_seed(42, i) for i in range(3)] == [42, 43, 44]
    assert [sample_seed(9_999_999_998, i) for i in range(4)] == [9_999_999_998, 9_999_999_999, 1, 2]
    assert sample_seed(SEED_MAX, 1) == SEED_MIN and sample_seed(SEED_MIN, 0) == SEED_MIN
    assert sample_seed(7, SEED_MAX) == 7  # a full lap of the range
    for seed in (SEED_MIN, 5, SEED_MAX - 3, SEED_MAX):
        seeds = [sample_seed(seed, i) for i in range(8)]
        assert all(SEED_MIN <= s <= SEED_MAX for s in seeds) and len(set(seeds)) == 8
