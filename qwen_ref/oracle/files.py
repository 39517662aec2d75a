"""The oracle's files: the errors for unusable inputs, reading JSONL / JSON inputs, writing outputs ("-": stdio)."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qwen_ref.errors import QwenRefError


class OracleFileError(QwenRefError, ValueError):
    """An input of score or compare cannot be used: the message names the file, the line and what is wrong."""


class BackendFileError(OracleFileError):
    """A backend's output file is malformed or lacks what the comparison needs."""


class ScoreInputError(OracleFileError):
    """A sequence given to score is malformed."""


def json_objects(path: Path, error: type[OracleFileError]) -> Iterator[tuple[str, Any]]:
    """(where, object) for a JSONL file, a JSON array of objects, or one JSON document ("-": stdin)."""
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if text.lstrip().startswith("data:"):
        raise error(f"{path}:1: this is a stream of server-sent events; save the non-streaming response "
                    "(stream: false) instead")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, list):
        for i, obj in enumerate(whole):
            yield f"{path}: item {i}", obj
        return
    if isinstance(whole, dict):
        yield f"{path}:1", whole
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{n}", json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None


class open_output:
    """A text file for writing, or stdout for "-"."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)

    def __enter__(self) -> Any:
        if self.path == "-":
            return sys.stdout
        try:
            self.file = open(self.path, "w", encoding="utf-8")
        except OSError as e:
            raise QwenRefError(f"{self.path}: cannot write ({e.strerror})") from None
        return self.file

    def __exit__(self, *exc: object) -> None:
        if self.path != "-":
            self.file.close()


def finite_or_none(x: float | None) -> float | None:
    # JSON has no infinities: -inf logprobs (probability exactly 0) are written as null
    return x if x is None or math.isfinite(x) else None
