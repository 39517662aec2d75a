"""A deliberately naive second implementation of docs/sampling.md, the oracle of the property tests.

Plain Python floats (IEEE float64) and loops, one token at a time, written from the document and sharing no
code with qwen_ref.sampling. Slow and obvious on purpose.
"""

from __future__ import annotations

import math

INF = math.inf


class NaiveAllMasked(Exception):
    pass


def _get(params: dict, name: str, absent: float | None) -> float | None:
    value = params.get(name)
    return absent if value is None else value


def naive_distribution(logits: list[float], params: dict, prompt: list[int], output: list[int],
                       allowed: list[bool] | None = None) -> tuple[list[float], list[bool], bool]:
    """Returns (probabilities, possible, ambiguous): `possible[i]` is False for every token some stage removed
    (its probability must be exactly 0); `ambiguous` is True when a top_p cumulative sum lies within 1e-12 of
    q (so a last-bit difference of exp between two implementations could move the cut)."""
    n = len(logits)
    z = [float(v) for v in logits]

    # stage 0
    if allowed is not None:
        for i in range(n):
            if not allowed[i]:
                z[i] = -INF
    if all(v == -INF for v in z):
        raise NaiveAllMasked

    # stage 1: repetition, once per distinct seen token
    r = _get(params, "repetition_penalty", 1.0)
    seen = sorted(set(prompt) | set(output))
    positive_seen = [t for t in seen if z[t] > 0]
    collapse = len(positive_seen) > 0 and (r == 0 or any(z[t] / r == INF for t in positive_seen))
    if collapse:
        best = max(z[t] for t in positive_seen)
        winner = min(t for t in positive_seen if z[t] == best)
        kept_value = z[winner]
        z = [-INF] * n
        z[winner] = kept_value
    else:
        for t in seen:
            if z[t] > 0:
                z[t] = z[t] / r
            elif z[t] != -INF:
                z[t] = z[t] * r

    # stage 2: frequency and presence, output only
    f = _get(params, "frequency_penalty", 0.0)
    p = _get(params, "presence_penalty", 0.0)
    for t in set(output):
        c = output.count(t)
        z[t] = z[t] - f * c - p * 1.0

    # stage 3: greedy
    temperature = _get(params, "temperature", 0.6)
    if temperature == 0:
        best = max(z)
        winner = min(i for i in range(n) if z[i] == best)
        probs = [0.0] * n
        probs[winner] = 1.0
        return probs, [i == winner for i in range(n)], False

    # stage 4: top_k on the penalized logits (dividing by T > 0 keeps their order)
    possible = [v != -INF for v in z]
    k = params.get("top_k")
    if k is not None and k < n:
        kth = sorted(z, reverse=True)[k - 1]
        for i in range(n):
            if z[i] < kth:
                possible[i] = False

    # stage 3 applied: shift by the max, then divide by T
    top = max(z[i] for i in range(n) if possible[i])
    y = [(z[i] - top) / temperature if possible[i] else -INF for i in range(n)]

    # stage 5: top_p
    ambiguous = False
    q = _get(params, "top_p", 1.0)
    if q < 1:
        probs = _naive_softmax(y)
        order = sorted(range(n), key=lambda i: (-probs[i], i))
        total = 0.0
        for rank, i in enumerate(order):
            if rank > 0 and total >= q:
                possible[i] = False
                y[i] = -INF
                previous = probs[order[rank - 1]]
                if probs[i] != previous and abs(probs[i] - previous) <= 1e-12 * previous:
                    ambiguous = True  # near-equal neighbours across the cut could swap
                continue
            total = total + probs[i]
            if 0 < abs(total - q) <= 1e-12:
                ambiguous = True

    # stage 6
    return _naive_softmax(y), possible, ambiguous


def _naive_softmax(y: list[float]) -> list[float]:
    top = max(y)
    e = [math.exp(v - top) if v != -INF else 0.0 for v in y]
    s = 0.0
    for v in e:  # left to right, token-id order
        s = s + v
    return [v / s for v in e]


def naive_draw(probs: list[float], u: float) -> int:
    total = 0.0
    for v in probs:
        total = total + v
    target = u * total
    running = 0.0
    for i, v in enumerate(probs):
        running = running + v
        if running > target:
            return i
    return max(i for i, v in enumerate(probs) if v > 0)
