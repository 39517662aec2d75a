"""The adapter config's regular expressions (target_modules or exclude_modules as a string, rank_pattern,
alpha_pattern, modules_to_save, layers_pattern), matched in bounded time.

PEFT matches them with Python's `re`, whose backtracking has no bound: `"(.+)+X"` against a 40-character module
name runs for hours. Here they are matched with the `regex` library (the same syntax and results as `re`) under
a time limit per match; a pattern that runs past it is a LoraError naming it. Patterns are also limited in
length. Matching happens when an adapter is planned against a model: once per adapter and model.
"""

from __future__ import annotations

import regex

from qwen_ref.lora.config import LoraError

MAX_PATTERN_CHARS = 1000
MATCH_TIMEOUT_S = 0.05  # a module name is under 100 characters: a sane pattern matches in microseconds


class PatternError(LoraError):
    """A pattern that cannot be used: invalid, too long, or too slow to match (catastrophic backtracking)."""


def check_pattern(pattern: str, where: str) -> None:
    if len(pattern) > MAX_PATTERN_CHARS:
        raise PatternError(f"{where}: the pattern is {len(pattern)} characters long; at most {MAX_PATTERN_CHARS}")
    try:
        regex.compile(pattern)
    except (regex.error, RecursionError, OverflowError) as e:
        raise PatternError(f"{where}: {pattern[:80]!r} is not a valid regular expression ({e})") from None


def matches(pattern: str, name: str, *, full: bool = False) -> regex.Match | None:
    """re.fullmatch (full=True) or re.match of pattern against a module name, in bounded time."""
    match = regex.fullmatch if full else regex.match
    try:
        return match(pattern, name, timeout=MATCH_TIMEOUT_S)
    except TimeoutError:
        raise PatternError(f"the adapter pattern {pattern[:80]!r} took over {MATCH_TIMEOUT_S}s to match the module "
                           f"{name[:80]!r} (nested quantifiers such as '(.+)+' backtrack without end); simplify "
                           "it") from None
