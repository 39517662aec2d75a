"""The one engine: scheduling, prefill, decode."""

from qwen_ref.engine.decode import (
    Chooser,
    SamplingChooser,
    Step,
    decode,
    generate_ids,
    greedy,
    right_pad,
)

__all__ = [
    "Chooser",
    "SamplingChooser",
    "Step",
    "decode",
    "generate_ids",
    "greedy",
    "right_pad",
]
