"""What counts as a disagreement with the reference: the |logprob difference| accepted for a backend computing
in each dtype, and the tolerances derived from it (docs/oracle.md, "Tolerances")."""

from __future__ import annotations

from dataclasses import dataclass

from qwen_ref.errors import QwenRefError

# |logprob difference| accepted for a backend computing in each dtype, against a float64 reference. Measured on
# the tiny qwen2.5 checkpoint (transformers eager vs our float64, teacher-forced and generated sequences):
# float32 max 4.0e-5 (mean 8e-6), float16 max 2.0e-2 (mean 3.8e-3), bfloat16 max 1.2e-1 (mean 2.6e-2). Real
# checkpoints are 10-30x deeper and wider and their error grows with depth and logit scale, so each bound is
# 4x to 12x the tiny model's maximum. float64: a pure float64 run agrees to ~1e-12, but transformers' float64
# keeps three float32 steps (RMSNorm, softmax, rotary angles), which put it 1.5e-5 off on the tiny model at
# position ~20 (the float32 rotary angle error grows with the position).
# One entry per compute dtype of qwen_ref.dtypes.DTYPES (a test checks it).
LOGPROB_TOLERANCE = {"float64": 1e-4, "float32": 5e-4, "float16": 0.1, "bfloat16": 0.5}


@dataclass(frozen=True)
class Thresholds:
    """What counts as a disagreement. `logprob` bounds |backend - reference| of a token's raw logprob and the
    margin by which our greedy token may beat the backend's; final-distribution logprobs get logprob / T
    (z / T scales logit errors by 1 / T). `kl` bounds KL(reference || backend) over the shared top-N, after
    renormalising both there. A sampled token outside our support is flagged only when it is further than
    `support_logit` below the top_k boundary (logit units) or `support_mass` / T past the top_p boundary
    (probability mass): closer than that, rounding may legitimately move the boundary."""

    logprob: float
    kl: float
    support_logit: float
    support_mass: float

    @classmethod
    def from_logprob(cls, logprob: float) -> Thresholds:
        # with every |error| <= e, KL over a renormalised set is ~ Var(error) / 2 <= e^2 / 2; the mass above
        # a top_p boundary moves by a probability-weighted mean of the errors, about e / 2 at worst in practice
        return cls(logprob, logprob**2 / 2, logprob, logprob / 2)

    @classmethod
    def for_dtype(cls, dtype: str) -> Thresholds:
        if dtype not in LOGPROB_TOLERANCE:
            raise QwenRefError(f"backend dtype: {dtype!r} is not one of {', '.join(LOGPROB_TOLERANCE)}")
        return cls.from_logprob(LOGPROB_TOLERANCE[dtype])

    @classmethod
    def for_dtypes(cls, backend: str, reference: str) -> Thresholds:
        """The looser of the two: a bfloat16 reference cannot check a float32 backend to float32 accuracy."""
        worst = max(backend, reference, key=lambda d: LOGPROB_TOLERANCE.get(d, 0.0))  # unknown: the other one
        return cls.for_dtype(worst)

    def describe(self) -> str:
        return (f"|dlogprob| {self.logprob:g}, KL {self.kl:.3g}, top_k margin {self.support_logit:g}, "
                f"top_p mass {self.support_mass:g}/T")

