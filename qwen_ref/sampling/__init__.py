"""The sampler, exactly as docs/sampling.md defines it. Import its names from here; the modules are:

    params.py              the request's sampling fields: SamplingParams, the one table of types and ranges
    rng.py                 Philox4x32-10 keyed by (seed, step), the seed range, fresh and per-sample seeds
    stages.py              the stages as pure batched functions (mask, temperature or argmax, top_k, top_p)
    penalties.py           the token history (PenaltyState, History) and stages 1-2, the penalties
    final_distribution.py  stages 0-6 of a batch to each row's final distribution; distribution()
    sampler.py             the decode loop's step: RequestState, sample(), draw(), logprobs
    tracing.py             trace() of one step through every stage, and format_trace()
    json_schema.py         JSON mode: response_format to a checked JSON Schema and an llguidance grammar
    json_mask.py           JSON mode: the token mask of stage 0 (llguidance, an optional dependency; import
                           JSON mode's names from qwen_ref.sampling.json_mask)
"""

from qwen_ref.sampling.final_distribution import RowDistribution, distribution
from qwen_ref.sampling.params import SAMPLING_FIELDS, SamplingParams
from qwen_ref.sampling.penalties import (
    History,
    PenaltyState,
    frequency_presence_penalty,
    penalty_values,
    repetition_penalty,
)
from qwen_ref.sampling.rng import SEED_MAX, SEED_MIN, sample_seed
from qwen_ref.sampling.sampler import ForcedLogprobs, RequestState, TokenLogprobs, draw, forced_logprobs, sample
from qwen_ref.sampling.stages import (
    NEG_INF,
    SamplingError,
    argmax_tokens,
    mask_disallowed,
    temperature,
    top_k,
    top_p,
)
from qwen_ref.sampling.tracing import Candidate, StageView, Trace, format_trace, trace

__all__ = [
    "NEG_INF",
    "SAMPLING_FIELDS",
    "SEED_MAX",
    "SEED_MIN",
    "Candidate",
    "ForcedLogprobs",
    "History",
    "PenaltyState",
    "RequestState",
    "RowDistribution",
    "SamplingError",
    "SamplingParams",
    "StageView",
    "TokenLogprobs",
    "Trace",
    "argmax_tokens",
    "distribution",
    "draw",
    "forced_logprobs",
    "format_trace",
    "frequency_presence_penalty",
    "mask_disallowed",
    "penalty_values",
    "repetition_penalty",
    "sample",
    "sample_seed",
    "temperature",
    "top_k",
    "top_p",
    "trace",
]
