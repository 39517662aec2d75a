"""Each stage on its own: against HF transformers' processor where HF accepts the value, against the
vLLM/OpenAI formula for frequency and presence, and the token history the penalties read."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from qwen_ref.sampling import (
    NEG_INF,
    History,
    PenaltyState,
    SamplingError,
    SamplingParams,
    argmax_tokens,
    frequency_presence_penalty,
    mask_disallowed,
    penalty_values,
    repetition_penalty,
    temperature,
    top_k,
    top_p,
)


def _random_logits(g: torch.Generator, b: int, v: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    x = torch.randn(b, v, generator=g, dtype=torch.float64) * 3
    x[:, ::5] = torch.round(x[:, ::5])  # some exact ties
    return x.to(dtype)


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**31), st.floats(1e-3, 2.0), st.integers(1, 40))
def test_repetition_penalty_equals_hf(seed: int, r: float, length: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = _random_logits(g, 3, 64)
    ids = torch.randint(0, 64, (3, length), generator=g)
    expected = RepetitionPenaltyLogitsProcessor(penalty=float(r))(ids, x.clone())
    got = repetition_penalty(x, History.from_lists(ids.tolist(), [[]] * 3), torch.full((3,), r))
    assert torch.equal(got, expected)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31), st.floats(1e-3, 5.0))
def test_temperature_equals_hf(seed: int, t: float) -> None:
    x = _random_logits(torch.Generator().manual_seed(seed), 3, 64)
    assert torch.equal(temperature(x, torch.full((3,), t)), TemperatureLogitsWarper(float(t))(None, x.clone()))


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**31), st.integers(1, 50), st.integers(2, 64))
def test_top_k_equals_hf(seed: int, k: int, v: int) -> None:
    x = _random_logits(torch.Generator().manual_seed(seed), 3, v)
    assert torch.equal(top_k(x, torch.full((3,), k)), TopKLogitsWarper(k)(None, x.clone()))


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**31), st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0, 1)))
def test_top_p_equals_hf(seed: int, q: float) -> None:
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3
    for row in x:  # stay away from the cut, where the two summation orders may round differently
        probs = torch.softmax(row, -1).sort(descending=True).values
        assume(bool(((probs.cumsum(0) - q).abs() > 1e-9).all()))
    expected = torch.softmax(TopPLogitsWarper(q)(None, x.clone()), -1)
    got = torch.softmax(top_p(x, torch.full((2,), q, dtype=torch.float64)), -1)
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)


def test_frequency_presence_equal_the_openai_vllm_formula() -> None:
    g = torch.Generator().manual_seed(0)
    x = _random_logits(g, 4, 100)
    outputs = [torch.randint(0, 100, (n,), generator=g).tolist() for n in (0, 5, 30, 80)]
    prompts = [torch.randint(0, 100, (20,), generator=g).tolist() for _ in range(4)]
    f = torch.tensor([0.0, 0.5, 1.7, 2.0])
    p = torch.tensor([2.0, 0.0, 0.3, 1.1])
    counts = torch.stack([torch.bincount(torch.tensor(o, dtype=torch.long), minlength=100) for o in outputs])
    expected = x - f[:, None] * counts - p[:, None] * (counts > 0)  # vLLM apply_penalties, in float32
    got = frequency_presence_penalty(x, History.from_lists(prompts, outputs), f, p)
    assert torch.equal(got, expected)


def test_argmax_tokens_break_ties_to_the_lowest_id() -> None:
    x = torch.tensor([[1.0, 7.0, 3.0, 7.0], [NEG_INF, -2.0, -2.0, NEG_INF], [0.5, 0.5, 0.5, 0.5]])
    assert argmax_tokens(x).tolist() == [1, 1, 0]


def test_mask_disallowed_sets_minus_infinity_and_copies() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    allowed = torch.tensor([[True, False, True], [False, False, True]])
    assert mask_disallowed(x, allowed).tolist() == [[1.0, NEG_INF, 3.0], [NEG_INF, NEG_INF, 6.0]]
    unmasked = mask_disallowed(x, None)
    assert torch.equal(unmasked, x) and unmasked.data_ptr() != x.data_ptr()


# ----------------------------------------------------------------------------------------------------------
# The token history


def test_penalty_state_grows_incrementally() -> None:
    state = PenaltyState([5, 1, 5], [])
    for t in [2, 2, 9, *range(100, 200)]:
        state.add_output(t)
    state.add_output([1, 1])
    fresh = PenaltyState([5, 1, 5], [2, 2, 9, *range(100, 200), 1, 1])
    assert torch.equal(state.seen_mask(300), fresh.seen_mask(300))
    assert torch.equal(state.output_counts(300), fresh.output_counts(300))
    assert state.output_counts(300)[[1, 2, 5, 9, 150]].tolist() == [2, 2, 0, 1, 1]
    with pytest.raises(SamplingError):
        state.add_output(-1)


def test_history_accepts_tensors_and_arrays() -> None:
    a = PenaltyState(torch.tensor([3, 4, 3]), np.array([5, 5, 3]))
    b = PenaltyState([3, 4, 3], [5, 5, 3])
    assert a.ids.tolist() == b.ids.tolist() == [3, 4, 5]
    assert a.counts.tolist() == b.counts.tolist() == [1, 0, 2]
    for bad in ([1.5], [-1], [True]):
        with pytest.raises(SamplingError):
            PenaltyState(bad)


def test_penalty_values_put_absent_penalties_at_their_neutral_values() -> None:
    params = [SamplingParams(), SamplingParams(repetition_penalty=1.5, frequency_penalty=0, presence_penalty=0.2)]
    r, f, p = penalty_values(params, torch.device("cpu"))
    assert r.dtype == f.dtype == p.dtype == torch.float64
    assert (r.tolist(), f.tolist(), p.tolist()) == ([1.0, 1.5], [0.0, 0.0], [0.0, 0.2])
