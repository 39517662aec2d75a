"""Checking other backends against the reference: read their files, score, compare, report.

formats/ reads each backend's output into BackendRecords; token_map.py maps their tokens to our ids; score.py
teacher-forces token ids through the reference; compare.py checks a backend position by position (support.py
explains, with the sampler's own stages, why a token is outside our sampler's support; thresholds.py holds the
tolerances); report.py is what it finds; transformers_backend.py makes a backend file from transformers;
cli.py is `qwen-ref score` and `qwen-ref compare`. docs/oracle.md is the user's guide.
"""

from qwen_ref.oracle.cli import add_compare_arguments, add_score_arguments, run_compare, run_score
from qwen_ref.oracle.compare import FLOAT32_EXP_UNDERFLOW, LOG_FLOOR, compare
from qwen_ref.oracle.files import BackendFileError, OracleFileError, ScoreInputError
from qwen_ref.oracle.formats import (
    FORMATS,
    Alternative,
    BackendRecord,
    BackendToken,
    detect_format,
    read_backend_file,
    read_backend_object,
)
from qwen_ref.oracle.formats.params import SAMPLING_FIELDS, VLLM_GREEDY_BELOW
from qwen_ref.oracle.report import Position, RecordResult, Report
from qwen_ref.oracle.score import CHUNK, next_token_logits, raw_logprobs, score
from qwen_ref.oracle.thresholds import LOGPROB_TOLERANCE, Thresholds
from qwen_ref.oracle.token_map import Mapped, TokenMap
from qwen_ref.oracle.transformers_backend import make_backend_file_from_transformers, transformers_processors

__all__ = [
    "CHUNK",
    "FLOAT32_EXP_UNDERFLOW",
    "FORMATS",
    "LOGPROB_TOLERANCE",
    "LOG_FLOOR",
    "SAMPLING_FIELDS",
    "VLLM_GREEDY_BELOW",
    "Alternative",
    "BackendFileError",
    "BackendRecord",
    "BackendToken",
    "Mapped",
    "OracleFileError",
    "Position",
    "RecordResult",
    "Report",
    "ScoreInputError",
    "Thresholds",
    "TokenMap",
    "add_compare_arguments",
    "add_score_arguments",
    "compare",
    "detect_format",
    "make_backend_file_from_transformers",
    "next_token_logits",
    "raw_logprobs",
    "read_backend_file",
    "read_backend_object",
    "run_compare",
    "run_score",
    "score",
    "transformers_processors",
]
