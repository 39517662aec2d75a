"""The one engine: continuous batching, chunked prefill, per-request isolation and cancellation, and the
exact / invariant / fast decode choice. generate(), the CLI and the server all run requests through it."""

from qwen_ref.engine.engine import DEFAULT_MAX_RUNNING, DEFAULT_PREFILL_CHUNK, DEFAULT_PREFILL_RATIO, Engine
from qwen_ref.engine.ids import generate_ids
from qwen_ref.engine.runner import DECODE_MODES, decode_mode
from qwen_ref.engine.sequence import EngineRequest, Event, Failed, Finished, Prompt, Sequence, Token

__all__ = [
    "DECODE_MODES",
    "DEFAULT_MAX_RUNNING",
    "DEFAULT_PREFILL_CHUNK",
    "DEFAULT_PREFILL_RATIO",
    "Engine",
    "EngineRequest",
    "Event",
    "Failed",
    "Finished",
    "Prompt",
    "Sequence",
    "Token",
    "decode_mode",
    "generate_ids",
]
