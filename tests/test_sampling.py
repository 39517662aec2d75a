"""The sampler against docs/sampling.md: a naive oracle, the spec's edge cases, batch independence, the trace,
logprobs, the package's public names and the examples of the docs. Each stage alone, the generator and the
parameters are tested in test_sampling_stages.py, test_sampling_rng.py and test_sampling_params.py."""

from __future__ import annotations

import importlib
import inspect
import math
import pkgutil
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from naive_sampler import NaiveAllMasked, naive_distribution, naive_draw

from qwen_ref.sampling import (
    RequestState,
    SamplingError,
    distribution,
    draw,
    format_trace,
    sample,
    trace,
)
from qwen_ref.sampling.rng import uniform

INF = math.inf
DOCS = Path(__file__).resolve().parents[1] / "docs" / "sampling.md"

# ----------------------------------------------------------------------------------------------------------
# Strategies

finite_logit = st.one_of(
    st.sampled_from([0.0, 1.0, -1.0, 2.5, -2.5, 0.5]),  # a small pool, so ties are common
    st.floats(-30, 30),
    st.floats(-1e300, 1e300),
    st.floats(-1e-300, 1e-300),
)
penalty = st.one_of(st.none(), st.sampled_from([0.0, 1.0, 2.0]), st.floats(0, 2))


@st.composite
def cases(draw_: st.DrawFn) -> tuple[list[float], dict, list[int], list[int], list[bool] | None]:
    n = draw_(st.integers(2, 64))
    logits = draw_(st.lists(st.one_of(finite_logit, st.just(-INF)), min_size=n, max_size=n))
    params = {
        "temperature": draw_(st.one_of(st.none(), st.sampled_from([0.0, 5.0, 1.0]), st.floats(0, 5))),
        "top_p": draw_(st.one_of(st.none(), st.sampled_from([0.0, 1.0, 2.0]), st.floats(0, 2))),
        "top_k": draw_(st.one_of(st.none(), st.sampled_from([1, 50]), st.integers(1, 50))),
        "repetition_penalty": draw_(penalty),
        "frequency_penalty": draw_(penalty),
        "presence_penalty": draw_(penalty),
    }
    token = st.integers(0, n - 1)
    prompt = draw_(st.lists(token, max_size=12))
    output = draw_(st.lists(token, max_size=12))
    allowed = draw_(st.one_of(st.none(), st.lists(st.booleans(), min_size=n, max_size=n)))
    return logits, params, prompt, output, allowed


def _mask(allowed: list[bool] | None) -> torch.Tensor | None:
    return None if allowed is None else torch.tensor(allowed)


# ----------------------------------------------------------------------------------------------------------
# The distribution against the naive implementation


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_distribution_matches_naive_oracle(case: tuple) -> None:
    logits, params, prompt, output, allowed = case
    x = torch.tensor(logits, dtype=torch.float64)
    try:
        expected, possible, ambiguous = naive_distribution(logits, params, prompt, output, allowed)
    except NaiveAllMasked:
        with pytest.raises(SamplingError, match="masked"):
            distribution(x, params, prompt, output, _mask(allowed))
        return
    assume(not ambiguous)
    got = distribution(x, params, prompt, output, _mask(allowed))
    assert got.dtype == torch.float64 and got.shape == x.shape
    assert not torch.isnan(got).any() and bool((got >= 0).all())
    assert abs(float(got.sum()) - 1.0) < 1e-9
    removed = ~torch.tensor(possible)
    assert bool((got[removed] == 0).all()), "a removed token has nonzero probability"
    masked = torch.isneginf(x) | (~_mask(allowed) if allowed is not None else torch.zeros_like(removed))
    assert bool((got[masked] == 0).all())
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31), st.integers(100, 3000), st.floats(0.05, 3.0), st.floats(0, 1), st.booleans())
def test_large_vocab_top_p_matches_naive_oracle(seed: int, n: int, scale: float, q: float, coarse: bool) -> None:
    # a flat distribution over many tokens, so the top_p cut lies beyond the first sorted head
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    if coarse:
        x = torch.round(x * 4) / 4  # many exact ties
    params = {"temperature": 1.0, "top_p": q, "repetition_penalty": 1.5}
    expected, possible, ambiguous = naive_distribution(x.tolist(), params, [0, 1, 2], [])
    assume(not ambiguous)
    got = distribution(x, params, [0, 1, 2], [])
    assert bool((got[~torch.tensor(possible)] == 0).all())
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-9)


@settings(max_examples=150, deadline=None)
@given(cases(), st.integers(1, 9_999_999_999), st.integers(0, 10_000))
def test_draw_matches_naive_draw(case: tuple, seed: int, step: int) -> None:
    logits, params, prompt, output, allowed = case
    try:
        p = distribution(torch.tensor(logits, dtype=torch.float64), params, prompt, output, _mask(allowed))
    except SamplingError:
        return
    token = draw(p, seed, step)
    assert token == naive_draw(p.tolist(), uniform(seed, step))
    assert p[token] > 0


def test_float32_logits_agree_with_float64_on_generic_input() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1000, generator=g) * 4
    params = {"temperature": 0.8, "top_p": 0.95, "repetition_penalty": 1.2, "frequency_penalty": 0.4,
              "presence_penalty": 0.3}
    prompt, output = list(range(0, 1000, 7)), [3, 3, 5, 900]
    p32 = distribution(x.float(), params, prompt, output)
    p64 = distribution(x.double(), params, prompt, output)
    assert (p32 - p64).abs().max() < 1e-5


# ----------------------------------------------------------------------------------------------------------
# Edge cases of the spec


def test_neutral_stages_leave_softmax_over_temperature() -> None:
    x = torch.randn(300, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    neutral = {"temperature": 0.7, "repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
               "top_p": 1.0}
    expected = torch.softmax(x / 0.7, dim=-1)
    for top_p_value in (1.0, 2.0, None):
        p = distribution(x, {**neutral, "top_p": top_p_value}, [1, 2, 3], [4, 4])
        assert torch.allclose(p, expected, rtol=0, atol=1e-15)


def test_repetition_penalty_zero_seen_positive_wins_outright() -> None:
    x = torch.tensor([3.0, 1.0, 2.0, 2.0, 5.0, -1.0], dtype=torch.float64)
    # seen: 1, 2, 3, 5 -> positive seen 1 (1.0), 2 (2.0), 3 (2.0); the largest ties at 2 and 3 -> id 2
    p = distribution(x, {"temperature": 1.0, "repetition_penalty": 0.0}, [1, 2, 3], [5])
    assert p.tolist() == [0, 0, 1, 0, 0, 0]


def test_repetition_penalty_zero_without_seen_positive_sets_seen_logits_to_zero() -> None:
    x = torch.tensor([1.0, -2.0, -INF, -3.0], dtype=torch.float64)
    p = distribution(x, {"temperature": 1.0, "repetition_penalty": 0.0}, [1, 2], [3])
    e = [math.e, 1.0, 0.0, 1.0]
    assert not torch.isnan(p).any()
    assert torch.allclose(p, torch.tensor(e, dtype=torch.float64) / sum(e), rtol=0, atol=1e-15)
    assert p[2] == 0


def test_tiny_positive_repetition_penalty_overflow_is_the_same_limit() -> None:
    x = torch.tensor([1.0, 1e300, 2.0, 0.5], dtype=torch.float32)  # float32: 1e300 is +inf -> rejected
    with pytest.raises(SamplingError, match="NaN or \\+inf"):
        distribution(x, {"temperature": 1.0}, [], [])
    x = torch.tensor([1.0, 4.0, 2.0, 0.5], dtype=torch.float32)
    p = distribution(x, {"temperature": 1.0, "repetition_penalty": 1e-45}, [0, 2, 3], [])
    assert p.tolist() == [0, 0, 1, 0]  # 2.0 / 1e-45 overflows float32: token 2, the largest seen, wins


def test_top_p_edges() -> None:
    x = torch.tensor([1.0, 3.0, 3.0, 2.0], dtype=torch.float64)
    assert distribution(x, {"temperature": 1.0, "top_p": 0.0}).tolist() == [0, 1, 0, 0]  # tie -> lower id
    half = torch.tensor([0.0, 0.0, -INF], dtype=torch.float64)
    assert distribution(half, {"temperature": 1.0, "top_p": 0.5}).tolist() == [1, 0, 0]  # cum 0.5 >= 0.5
    assert distribution(half, {"temperature": 1.0, "top_p": 0.5000001}).tolist() == [0.5, 0.5, 0]
    ref = distribution(x, {"temperature": 1.0})
    for q in (1.0, 1.5, 2.0):
        assert torch.equal(distribution(x, {"temperature": 1.0, "top_p": q}), ref)


def test_top_k_keeps_ties_at_the_kth_logit() -> None:
    x = torch.tensor([5.0, 4.0, 4.0, 4.0, 1.0], dtype=torch.float64)
    p = distribution(x, {"temperature": 1.0, "top_k": 2})
    assert (p > 0).tolist() == [True, True, True, True, False]
    p = distribution(x, {"temperature": 1.0, "top_k": 50})  # k > V: no limit
    assert bool((p > 0).all())


def test_greedy_ties_break_to_lowest_id_and_ignore_the_seed() -> None:
    x = torch.tensor([1.0, 7.0, 3.0, 7.0], dtype=torch.float32)
    assert distribution(x, {"temperature": 0}).tolist() == [0, 1, 0, 0]
    for seed in (1, 2, 3):
        tokens, _ = sample(x[None], [RequestState.start({"temperature": 0, "seed": seed}, [])])
        assert tokens.tolist() == [1]


def test_tiny_temperature_is_not_clamped_and_never_nan() -> None:
    x = torch.tensor([1.0, 1.0 + 1e-12, -5.0], dtype=torch.float64)
    p = distribution(x, {"temperature": 5e-324})
    assert p.tolist() == [0, 1, 0]
    p = distribution(torch.tensor([-1e300, -1e300, -2e300], dtype=torch.float64), {"temperature": 1e-300})
    assert p.tolist() == [0.5, 0.5, 0]


def test_all_masked_row_and_bad_logits_are_errors() -> None:
    x = torch.tensor([1.0, 2.0, 3.0])
    with pytest.raises(SamplingError, match="row 0: every token is masked"):
        distribution(x, {}, allowed=torch.tensor([False, False, False]))
    with pytest.raises(SamplingError, match="masked"):
        distribution(torch.full((4,), -INF), {})
    with pytest.raises(SamplingError, match="row 1: the logits contain NaN"):
        sample(torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]),
               [RequestState.start({"seed": 1}, []) for _ in range(2)])
    with pytest.raises(SamplingError, match="outside the vocabulary"):
        distribution(x, {}, [7], [])


def test_frequency_and_presence_count_the_output_only() -> None:
    x = torch.zeros(4, dtype=torch.float64)
    p = distribution(x, {"temperature": 1.0, "frequency_penalty": 1.0, "presence_penalty": 0.5},
                     prompt_ids=[0, 0, 0], output_ids=[1, 2, 2])
    e = [1.0, math.exp(-1.5), math.exp(-2.5), 1.0]
    assert torch.allclose(p, torch.tensor(e, dtype=torch.float64) / sum(e), rtol=0, atol=1e-15)


def test_sums_are_sequential_as_documented() -> None:
    # the kept set and the draw rely on np.cumsum being a left-to-right loop (np.sum is pairwise)
    x = np.random.default_rng(0).random(5000) * 10.0 ** np.random.default_rng(1).integers(-12, 12, 5000)
    running, loop = 0.0, []
    for v in x.tolist():
        running += v
        loop.append(running)
    assert np.cumsum(x).tolist() == loop


# ----------------------------------------------------------------------------------------------------------
# Seeds: reproducible, and independent of the batch


def _fake_logits(history: list[int], vocab: int) -> torch.Tensor:
    """Deterministic 'model' logits from the token history, with ties and a forbidden token."""
    g = torch.Generator().manual_seed(zlib.crc32(np.asarray(history, dtype=np.int64).tobytes()))
    x = torch.randn(vocab, generator=g) * 2.5
    x[: vocab // 4] = torch.round(x[: vocab // 4] * 2) / 2
    x[7] = -INF
    return x


MIXED = [
    {"temperature": 0.0},
    {"temperature": 0.7, "top_k": 5, "seed": 11},
    {"temperature": 1.0, "top_p": 0.9, "seed": 12},
    {"temperature": 1.3, "top_k": 40, "top_p": 0.8, "repetition_penalty": 1.3, "frequency_penalty": 0.5,
     "presence_penalty": 0.4, "seed": 13},
    {"temperature": 5.0, "seed": 9_999_999_999},
    {"temperature": 0.6, "repetition_penalty": 0.0, "seed": 15},
    {"temperature": 0.9, "top_p": 0.0, "seed": 16},
    {"temperature": 0.8, "repetition_penalty": 0.7, "frequency_penalty": 2.0, "seed": 1},
]


def _run(requests: list[int], steps: list[int], prompts: list[list[int]], vocab: int = 300,
         logprobs: int | None = 2) -> dict[int, list]:
    """Decode the given requests together, each for its own number of steps, rows leaving when done."""
    states = {i: RequestState.start(MIXED[i], prompts[i]) for i in requests}
    produced: dict[int, list] = {i: [] for i in requests}
    while live := [i for i in requests if len(produced[i]) < steps[i]]:
        logits = torch.stack([_fake_logits(prompts[i] + [t for t, _ in produced[i]], vocab) for i in live])
        tokens, info = sample(logits, [states[i] for i in live], logprobs=logprobs)
        for row, i in enumerate(live):
            produced[i].append((int(tokens[row]), info[row] if info else None))
            states[i].accept(int(tokens[row]))
    return produced


def test_tokens_identical_alone_in_a_batch_and_at_other_positions() -> None:
    prompts = [[(5 * i + j) % 300 for j in range(3 + i)] for i in range(8)]
    steps = [12, 20, 16, 20, 9, 14, 20, 18]
    alone = {i: _run([i], steps, prompts)[i] for i in range(8)}
    together = _run(list(range(8)), steps, prompts)
    reversed_order = _run(list(reversed(range(8))), steps, prompts)
    assert together == alone
    assert reversed_order == alone
    assert _run(list(range(8)), steps, prompts) == together  # same seeds, same tokens, every run
    assert len({tuple(t for t, _ in alone[i]) for i in range(8)}) > 4  # the requests do differ


# ----------------------------------------------------------------------------------------------------------
# Trace, the allowed mask, logprobs


def test_trace_final_stage_is_the_distribution_and_formats() -> None:
    x = _fake_logits([1, 2, 3], 500)
    params = {"temperature": 0.8, "top_k": 20, "top_p": 0.7, "repetition_penalty": 1.2,
              "frequency_penalty": 0.3, "presence_penalty": 0.2}
    tr = trace(x, params, [1, 2, 3], [4, 4], top=5, seed=3, step=2)
    assert [s.name for s in tr.stages] == ["raw", "repetition_penalty", "frequency_presence", "temperature",
                                           "top_k", "top_p", "final"]
    assert torch.equal(tr.final.probs, distribution(x, params, [1, 2, 3], [4, 4]))
    assert tr.token == draw(tr.final.probs, 3, 2)
    kept = [s.kept for s in tr.stages]
    assert kept[0] == 499 and kept[4] <= 20 + 5 and kept[5] <= kept[4] and kept[6] == kept[5]
    for s in tr.stages:
        assert abs(float(s.probs.sum()) - 1) < 1e-9 and s.entropy >= 0 and len(s.top) <= 5
        assert not torch.isnan(s.probs).any()
    text = format_trace(tr, decode=lambda i: f"<{i}>")
    assert "top_p" in text and "entropy" in text and f"<{tr.final.top[0].id}>" in text
    widths = {len(line) for line in text.splitlines()[-3:]}
    assert len(widths) == 1  # a fixed-width table
    greedy_trace = trace(x, {"temperature": 0}, top=3)
    assert greedy_trace.token == int(torch.argmax(x)) and greedy_trace.final.kept == 1
    assert "greedy" in format_trace(greedy_trace)


@pytest.mark.parametrize("params", [
    {"temperature": 1e-300, "top_k": 3},
    {"temperature": 5.0, "repetition_penalty": 0.0, "top_p": 0.0},
    {"temperature": 0.3, "top_p": 2.0, "frequency_penalty": 2.0, "presence_penalty": 2.0},
])
def test_trace_extremes_have_no_nan(params: dict) -> None:
    x = _fake_logits([4], 64)
    allowed = torch.ones(64, dtype=torch.bool)
    allowed[10:20] = False
    tr = trace(x, params, [1, 2, 3], [4, 4], allowed=allowed)
    assert [s.name for s in tr.stages][:2] == ["raw", "mask"]
    assert torch.equal(tr.final.probs, distribution(x, params, [1, 2, 3], [4, 4], allowed))
    assert bool((tr.final.probs[10:20] == 0).all())
    for s in tr.stages:
        assert not torch.isnan(s.probs).any() and not torch.isnan(s.logits).any()
    assert "mask" in format_trace(tr)


def test_sample_applies_the_allowed_mask_per_row() -> None:
    x = torch.zeros(2, 10)
    allowed = torch.zeros(2, 10, dtype=torch.bool)
    allowed[0, 3] = True
    allowed[1, 6:8] = True
    rows = [RequestState.start({"temperature": 1.0, "seed": s}, []) for s in (1, 2)]
    for step in range(20):
        for row in rows:
            row.step = step
        tokens, _ = sample(x, rows, allowed=allowed)
        assert tokens[0] == 3 and tokens[1] in (6, 7)
    with pytest.raises(SamplingError, match="allowed must be a bool tensor"):
        sample(x, rows, allowed=allowed[:1])


def test_logprobs_under_raw_and_final_distributions() -> None:
    x = _fake_logits([9], 200)[None].repeat(2, 1)
    rows = [RequestState.start({"temperature": 0.9, "top_k": 10, "seed": 5}, [1]),
            RequestState.start({"temperature": 0}, [1])]
    tokens, info = sample(x, rows, logprobs=3)
    assert info is not None
    raw = torch.log_softmax(x[0].double(), -1)
    for row, lp in enumerate(info):
        assert lp.token == int(tokens[row])
        assert lp.raw == pytest.approx(float(raw[lp.token]), abs=1e-12)
        assert [i for i, _ in lp.raw_top] == torch.topk(raw, 3).indices.tolist()
    p = distribution(x[0], rows[0].params, [1], [])
    assert info[0].final == pytest.approx(math.log(float(p[info[0].token])), abs=1e-12)
    assert [v for _, v in info[0].final_top] == sorted((v for _, v in info[0].final_top), reverse=True)
    assert info[1].final == 0.0 and info[1].final_top == ((int(tokens[1]), 0.0),)
    assert sample(x, rows)[1] is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_same_tokens_on_cpu_and_gpu() -> None:
    prompts = [[i, i + 1] for i in range(8)]
    logits = torch.stack([_fake_logits(p, 151936) for p in prompts])
    rows = [RequestState.start(MIXED[i], prompts[i]) for i in range(8)]
    cpu, _ = sample(logits, rows)
    gpu, _ = sample(logits.cuda(), rows)
    assert cpu.tolist() == gpu.cpu().tolist()
    for i in range(8):
        assert torch.equal(distribution(logits[i], MIXED[i], prompts[i]),
                           distribution(logits[i].cuda(), MIXED[i], prompts[i]))


# ----------------------------------------------------------------------------------------------------------
# The package


def test_every_public_name_is_exported_and_no_module_shadows_one() -> None:
    import qwen_ref.sampling as sampling

    for module in pkgutil.iter_modules(sampling.__path__):
        importlib.import_module(f"qwen_ref.sampling.{module.name}")  # importing a submodule sets a package attribute
        assert module.name not in sampling.__all__, f"module {module.name} has the name of a public function"
    for name in sampling.__all__:
        assert getattr(sampling, name) is not None and not inspect.ismodule(getattr(sampling, name)), name
    assert sampling.distribution is distribution and sampling.trace is trace and callable(sampling.sample)
    assert "greedy" not in sampling.__all__ and sampling.RowDistribution.__dataclass_fields__["one_hot"]


def test_the_python_examples_of_the_docs_run(capsys: pytest.CaptureFixture[str]) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S)
    assert len(blocks) >= 2
    for code in blocks:
        exec(compile(code, str(DOCS), "exec"), {})
    assert "top_p" in capsys.readouterr().out  # the example prints a trace
