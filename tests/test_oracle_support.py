"""Why a token is outside our sampler's support (qwen_ref.oracle.support): the explanation compare gives must
agree with the sampler (qwen_ref.sampling.distribution) on every token it gives probability 0."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_ref.oracle.support import exclusion, greedy_margin
from qwen_ref.sampling import SamplingParams, distribution

LOGITS = torch.tensor([3.0, 2.0, 1.0, 0.0])


def explain(params: dict, token: int, logits: torch.Tensor = LOGITS, prompt=(), output=()):
    sp = SamplingParams.from_dict(params)
    assert float(distribution(logits, sp, prompt, output)[token]) == 0.0  # only excluded tokens are explained
    return exclusion(logits, token, sp, list(prompt), list(output))


def test_top_k_boundary_in_logits():
    reason, margin, unit = explain({"temperature": 1.0, "top_k": 2}, 2)
    assert (reason, margin, unit) == ("outside top_k=2: 1 below the k-th logit", 1.0, "logit")


def test_top_p_boundary_in_probability_mass():
    reason, margin, unit = explain({"temperature": 1.0, "top_p": 0.5}, 1)
    p0 = math.exp(3) / sum(math.exp(z) for z in (3, 2, 1, 0))
    assert unit == "mass" and margin == pytest.approx(p0 - 0.5, abs=1e-15)
    assert reason.startswith(f"outside top_p=0.5: the tokens before it already hold {p0:.6f} >= 0.5")


def test_repetition_penalty_zero_is_the_sampler_s_limit():
    # r = 0 keeps only the seen token with the largest positive logit: every other token is removed by stage 1
    reason, margin, unit = explain({"temperature": 1.0, "repetition_penalty": 0.0}, 0, prompt=[1])
    assert reason.startswith("the penalties remove it") and margin == math.inf and unit == "logit"


def test_greedy_margin_is_in_penalised_logits():
    sp = SamplingParams.from_dict({"temperature": 0, "repetition_penalty": 1.5})
    assert greedy_margin(LOGITS, sp, [0], [], 1, 0) == pytest.approx(2.0 - 3.0 / 1.5)


@st.composite
def rows(draw_: st.DrawFn) -> tuple[torch.Tensor, dict, list[int], list[int]]:
    n = draw_(st.integers(2, 48))
    pool = st.one_of(st.sampled_from([0.0, 1.0, -1.0, 2.5, 0.5]), st.floats(-20, 20, width=32))  # ties are common
    values = draw_(st.lists(st.one_of(pool, st.just(-math.inf)), min_size=n, max_size=n))
    dtype = draw_(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    logits = torch.tensor(values, dtype=dtype)
    if not torch.isfinite(logits).any():
        logits[0] = 0.0
    params = {"temperature": draw_(st.floats(0.05, 5)),
              "top_k": draw_(st.one_of(st.none(), st.integers(1, 50))),
              "top_p": draw_(st.one_of(st.none(), st.floats(0.01, 1.0))),
              "repetition_penalty": draw_(st.one_of(st.none(), st.sampled_from([0.0, 1.3]), st.floats(0, 2))),
              "frequency_penalty": draw_(st.one_of(st.none(), st.floats(0, 2))),
              "presence_penalty": draw_(st.one_of(st.none(), st.floats(0, 2)))}
    token = st.integers(0, n - 1)
    return logits, params, draw_(st.lists(token, max_size=8)), draw_(st.lists(token, max_size=8))


@settings(max_examples=300, deadline=None)
@given(rows())
def test_every_excluded_token_is_explained_on_the_excluded_side_of_its_boundary(row):
    logits, params, prompt, output = row
    sp = SamplingParams.from_dict(params)
    dist = distribution(logits, sp, prompt, output).numpy()
    for token in np.flatnonzero(dist == 0).tolist():
        reason, margin, unit = exclusion(logits, token, sp, prompt, output)
        assert margin >= 0, (token, reason)
        if unit == "mass":
            assert reason.startswith(f"outside top_p={sp.top_p}:")
        elif margin < math.inf:
            assert reason.startswith(f"outside top_k={sp.top_k}:") and margin > 0
