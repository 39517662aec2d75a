"""compare (qwen_ref.oracle.compare): the comparison checked against transformers on the tiny checkpoint, clean and
with injected faults.

Every "backend" here is transformers' own model and logits processors (make_backend_file_from_transformers),
clean or with one fault. Where a fault first shows is computed on the transformers side only (the faulty
backend against a clean transformers model, or the faulty processor's own record of what it did), so the
report's "first flagged position" is checked against knowledge that does not come from qwen_ref.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import hf_model

from qwen_ref.dtypes import DTYPES
from qwen_ref.oracle import (
    LOGPROB_TOLERANCE,
    Thresholds,
    compare,
    make_backend_file_from_transformers,
    read_backend_file,
    read_backend_object,
    transformers_processors,
)
from qwen_ref.qwen import load
from qwen_ref.sampling import SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
STEPS = 8
GREEDY = {"temperature": 0, "repetition_penalty": 1.1}
SAMPLED = {"temperature": 0.8, "top_k": 8, "top_p": 0.9, "repetition_penalty": 1.3}
FP32 = Thresholds.for_dtype("float32")


@pytest.fixture(scope="module")
def ckpt(tiny):
    return tiny("qwen2.5")


@pytest.fixture(scope="module")
def hf(ckpt):
    return hf_model(ckpt)


@pytest.fixture(scope="module")
def ref(ckpt):
    return load(ckpt)


@pytest.fixture(scope="module")
def ref64(ckpt):
    return load(ckpt, dtype="float64")


@pytest.fixture(scope="module")
def clean_file(tmp_path_factory, ckpt, hf):
    path = tmp_path_factory.mktemp("oracle") / "clean.jsonl"
    return make_backend_file_from_transformers(path, PROMPTS, checkpoint=ckpt, model=hf, params=[GREEDY, SAMPLED],
                                               max_new_tokens=STEPS, prompt_logprobs=True)


def backend(tmp_path, ckpt, model, prompts=PROMPTS[:1], params=GREEDY, **kw) -> tuple[list[dict], object]:
    path = make_backend_file_from_transformers(tmp_path / "backend.jsonl", prompts, checkpoint=ckpt, model=model,
                                               params=params, max_new_tokens=STEPS, **kw)
    return [json.loads(line) for line in path.read_text().splitlines()], read_backend_file(path)


def variant(model, dtype=torch.float32, **config_changes):
    """transformers' model built from a modified config, with the clean model's weights."""
    config = copy.deepcopy(model.config)
    for key, value in config_changes.items():
        if key == "rope_theta":
            config.rope_parameters = {**config.rope_parameters, "rope_theta": value}
        else:
            setattr(config, key, value)
    out = type(model)(config).eval()
    out.load_state_dict(model.state_dict())
    return out.to(dtype)


@torch.inference_mode()
def hf_diffs(clean, record: dict, dtype=torch.float32) -> tuple[list[float], list[float]]:
    """|clean transformers - backend| per prompt position (from 1) and per output step: where a fault shows,
    from transformers alone."""
    prompt, tokens = record["prompt_ids"], record["token_ids"]
    ids = torch.tensor([prompt + tokens])
    lp = torch.log_softmax(clean.to(dtype)(ids).logits[0].to(torch.float64), -1)
    out = [abs(float(lp[len(prompt) - 1 + s, t]) - record["logprobs"][s]) for s, t in enumerate(tokens)]
    pre = [abs(float(lp[i - 1, prompt[i]]) - record["prompt_logprobs"][i]) for i in range(1, len(prompt))] \
        if record.get("prompt_logprobs") else []
    return pre, out


def first_over(values: list[float], tolerance: float) -> int | None:
    return next((i for i, v in enumerate(values) if v > tolerance), None)


# ----------------------------------------------------------------------------------------------------------
# The clean backend agrees


def test_transformers_fp32_backend_has_no_flags(ref, clean_file, tmp_path):
    report = compare(ref, read_backend_file(clean_file))
    assert report.thresholds == FP32  # the tiny checkpoint is float32
    assert report.ok, report.format()
    assert [r.compared for r in report.records] == [STEPS, STEPS]
    assert all(p.via == "id" for p in report.positions)
    prompt_positions = [p for p in report.positions if p.phase == "prompt"]
    assert prompt_positions and prompt_positions[0].position == 1
    summary = report.summary()
    assert summary["flagged"] == 0 and summary["first_flag"] is None
    assert summary["max_abs_diff"] < FP32.logprob / 4
    assert report.records[0].sampler == "greedy" and report.records[0].greedy_divergence is None
    sampled = report.records[1]
    assert sampled.sampler == "T=0.8 k=8 p=0.9 rep=1.3"
    assert all(p.in_support for p in sampled.positions if p.phase == "output")
    assert all(p.final_abs_diff is not None for p in sampled.positions if p.phase == "output")
    report.write_jsonl(tmp_path / "details.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "details.jsonl").read_text().splitlines()]
    assert len(rows) == len(report.positions) and rows[0]["flags"] == []
    report.plot(tmp_path / "error.png")
    assert (tmp_path / "error.png").stat().st_size > 0
    assert "flagged: 0" in report.format()


def test_logprobs_of_the_final_distribution_are_compared_with_ours(ref, clean_file):
    # as llama.cpp's post_sampling_probs or vLLM's processed_logprobs give them
    line = json.loads(clean_file.read_text().splitlines()[1])
    final = {"prompt_ids": line["prompt_ids"], "token_ids": line["token_ids"], "logprobs": line["final_logprobs"],
             "logprobs_of": "final", "params": line["params"]}
    report = compare(ref, read_backend_object(final, "final:1"))
    assert report.ok, report.format()
    assert all(p.logprob == pytest.approx(p.final_logprob) for p in report.positions)
    shifted = {**final, "logprobs": [lp - 0.01 for lp in final["logprobs"]]}
    report = compare(ref, read_backend_object(shifted, "final:2"))
    assert report.first_flag.step == 0 and report.first_flag.flags == ["logprob"]


def test_transformers_fp64_backend_agrees_with_float64_reference(ref64, ckpt, hf, tmp_path):
    _, parsed = backend(tmp_path, ckpt, copy.deepcopy(hf).double(), dtype="float64")
    report = compare(ref64, parsed, backend_dtype="float64")
    assert report.ok, report.format()
    assert report.summary()["max_abs_diff"] < 3e-5  # transformers' float32 islands (rotary angles) only


# ----------------------------------------------------------------------------------------------------------
# Model faults are caught and located


def test_wrong_rope_theta_is_flagged_from_the_second_prompt_position(ref, ckpt, hf, tmp_path):
    records, parsed = backend(tmp_path, ckpt, variant(hf, rope_theta=1e4), prompt_logprobs=True)
    report = compare(ref, parsed)
    assert not report.ok
    first = report.first_flag
    pre, _ = hf_diffs(hf, records[0])
    # position 0 attends only to itself, where any rotation cancels: the first wrong logprob is the token at 2
    assert first.phase == "prompt" and first.position == 1 + first_over(pre, FP32.logprob) == 2
    assert "logprob" in first.flags
    assert "first flagged: record 0" in report.format() and "position 2" in report.format()


def test_dropped_qkv_bias_is_flagged_at_the_first_step(ref, ckpt, hf, tmp_path):
    faulty = copy.deepcopy(hf)
    for layer in faulty.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            proj.bias.data.zero_()
    records, parsed = backend(tmp_path, ckpt, faulty)
    report = compare(ref, parsed)
    _, out = hf_diffs(hf, records[0])
    assert report.first_flag.phase == "output" and report.first_flag.step == first_over(out, FP32.logprob) == 0
    # its greedy tokens follow its own (wrong) argmax: where ours would differ is reported too
    divergence = report.records[0].greedy_divergence
    assert divergence is not None and "greedy" in divergence.flags


def test_rmsnorm_eps_off_by_10x_is_flagged_against_float64(ref64, ckpt, hf, tmp_path):
    # eps 1e-6 -> 1e-5 moves logprobs by ~1e-5..1e-3 on this model: visible above float64 noise (the clean
    # float64 backend above stays under 3e-5), invisible in bfloat16 (see docs/oracle.md)
    clean64 = copy.deepcopy(hf).double()
    records, parsed = backend(tmp_path, ckpt, variant(hf, torch.float64, rms_norm_eps=1e-5), dtype="float64")
    report = compare(ref64, parsed, backend_dtype="float64")
    assert not report.ok
    tolerance = Thresholds.for_dtype("float64").logprob
    _, out = hf_diffs(clean64, records[0], torch.float64)
    assert report.first_flag.step == first_over(out, tolerance)
    assert all(d < tolerance for d in out[: report.first_flag.step])


# ----------------------------------------------------------------------------------------------------------
# Sampler faults are caught and located


class IgnoresRepetitionPenalty:
    """Samples without the repetition penalty; remembers, per step, the chosen token's log-probability under
    transformers' correct chain and under its own."""

    def __init__(self, params: SamplingParams):
        self.correct = transformers_processors(params)
        self.faulty = transformers_processors(SamplingParams.from_dict(
            {k: v for k, v in params.to_dict().items() if k not in ("repetition_penalty", "max_tokens")}))
        self.steps: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, input_ids, scores):
        correct = self.correct(input_ids, scores.clone())
        faulty = self.faulty(input_ids, scores.clone())
        self.steps.append((torch.log_softmax(correct[0], -1), torch.log_softmax(faulty[0], -1)))
        return faulty


def test_backend_ignoring_repetition_penalty_is_flagged_where_it_first_matters(ref, ckpt, hf, tmp_path):
    params = {"temperature": 0.8, "top_k": 4, "repetition_penalty": 1.5}
    faults = []

    def processors(sp):
        faults.append(IgnoresRepetitionPenalty(sp))
        return faults[-1]

    records, parsed = backend(tmp_path, ckpt, hf, params=params, processors=processors)
    report = compare(ref, parsed)
    assert not report.ok
    first = report.first_flag
    assert set(first.flags) <= {"final_logprob", "support"}
    assert not any("logprob" in p.flags or "kl" in p.flags for p in report.positions)  # the model is fine
    tolerance = FP32.logprob / params["temperature"]
    tokens = records[0]["token_ids"]
    shows = [math.isinf(c[t]) or abs(float(c[t] - f[t])) > tolerance
             for (c, f), t in zip(faults[0].steps, tokens)]
    assert first.step == shows.index(True)


class KeepsOneTooMany:
    """top_p that keeps the best token the nucleus would have removed; remembers which one, per step."""

    def __init__(self, params: SamplingParams):
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper

        self.temperature = TemperatureLogitsWarper(params.temperature)
        self.top_p = TopPLogitsWarper(params.top_p)
        self.extra: list[int] = []

    def __call__(self, input_ids, scores):
        scaled = self.temperature(input_ids, scores)
        kept = self.top_p(input_ids, scaled)
        removed = torch.isinf(kept) & ~torch.isinf(scaled)
        extra = int(torch.argmax(torch.where(removed, scaled, -math.inf)))
        kept[0, extra] = scaled[0, extra]
        self.extra.append(extra)
        return kept


def test_top_p_keeping_one_token_too_many_is_flagged_at_the_first_extra_token(ref, ckpt, hf, tmp_path):
    params = {"temperature": 1.0, "top_p": 0.01}  # the nucleus is the best token; the fault adds the second
    faults = []

    def processors(sp):
        faults.append(KeepsOneTooMany(sp))
        return faults[-1]

    # no final logprobs: only the tokens themselves can give the fault away
    records, parsed = backend(tmp_path, ckpt, hf, params=params, processors=processors, final_logprobs=False,
                              seed=1)
    drawn = [t == e for t, e in zip(records[0]["token_ids"], faults[0].extra)]
    assert any(drawn), "the seed never drew the extra token; pick another seed"
    report = compare(ref, parsed)
    first = report.first_flag
    assert first.flags == ["support"] and first.step == drawn.index(True)
    assert "outside top_p=0.01" in first.support
    assert all(("support" in p.flags) == d for p, d in zip(report.records[0].positions, drawn))


def test_tokens_without_logprobs_are_still_checked_for_greedy_agreement(ref):
    # a backend that returns no logprobs (Workers AI): its greedy tokens still must be our argmax
    prompt = [9707, 11, 1879]
    greedy: list[int] = []
    with torch.no_grad():
        for _ in range(4):
            greedy.append(int(ref.model(torch.tensor([prompt + greedy]))[0, -1].argmax()))
    wrong = [*greedy[:2], (greedy[2] + 1) % 1000, greedy[3]]
    lines = [{"prompt_ids": prompt, "token_ids": ids, "params": {"temperature": 0}} for ids in (greedy, wrong)]
    report = compare(ref, [r for i, line in enumerate(lines) for r in read_backend_object(line, f"w:{i}")])
    assert report.records[0].flagged == [] and report.records[0].greedy_divergence is None
    assert report.first_flag.record == 1 and report.first_flag.step == 2 and report.first_flag.flags == ["greedy"]
    assert report.records[1].greedy_divergence.step == 2 and report.first_flag.abs_diff is None


# ----------------------------------------------------------------------------------------------------------

def test_unmapped_token_stops_the_comparison_and_is_reported(ref):
    obj = {"request": {"prompt": "Hi"}, "response": {"choices": [{"message": {"content": "??"}, "logprobs": {
        "content": [{"token": "Hello", "logprob": -1.0, "top_logprobs": []},
                    {"token": "\ufffd", "logprob": -1.0, "top_logprobs": []}]}}]}}
    report = compare(ref, read_backend_object(obj, "f:1"), params={"temperature": 0}, backend_dtype="bfloat16")
    (record,) = report.records
    assert record.unmapped[0] == 1 and "fragment" in record.unmapped[1]
    assert record.compared == 1 and not report.ok
    assert "compared up to step 1" in report.format()




# ----------------------------------------------------------------------------------------------------------
# Thresholds


def test_thresholds_cover_every_dtype_and_take_the_looser_of_two():
    assert set(LOGPROB_TOLERANCE) == set(DTYPES)
    assert Thresholds.for_dtypes("float32", "bfloat16") == Thresholds.for_dtype("bfloat16")
    assert Thresholds.for_dtypes("float64", "float32") == FP32
    assert Thresholds.for_dtypes("float64", "float64") == Thresholds.from_logprob(LOGPROB_TOLERANCE["float64"])
