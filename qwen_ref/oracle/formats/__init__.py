"""Backend output files: one reader per format (openai.py, vllm.py, llama_cpp.py, tgi.py, jsonl.py), each making
BackendRecords (records.py); here the format is detected per object and a whole file is read."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from qwen_ref.oracle.files import BackendFileError, json_objects
from qwen_ref.oracle.formats.jsonl import read_jsonl
from qwen_ref.oracle.formats.llama_cpp import read_llama_cpp
from qwen_ref.oracle.formats.openai import read_openai
from qwen_ref.oracle.formats.records import Alternative, BackendRecord, BackendToken
from qwen_ref.oracle.formats.tgi import read_tgi
from qwen_ref.oracle.formats.vllm import read_vllm

FORMATS = ("auto", "openai", "vllm", "llama.cpp", "tgi", "jsonl")

_READERS: dict[str, Callable[[dict[str, Any], dict[str, Any] | None, str], list[BackendRecord]]] = {
    "openai": read_openai, "vllm": read_vllm, "llama.cpp": read_llama_cpp, "tgi": read_tgi, "jsonl": read_jsonl,
}
_SERVERS_WITH_OPENAI_ROUTES = ("vllm", "llama.cpp", "tgi")  # their OpenAI routes write choices[]: read as openai


def detect_format(obj: Mapping[str, Any]) -> str | None:
    if "choices" in obj:
        return "openai"
    if "outputs" in obj:
        return "vllm"
    if "completion_probabilities" in obj:
        return "llama.cpp"
    if isinstance(obj.get("details"), dict) and "tokens" in obj["details"]:
        return "tgi"
    if "token_ids" in obj:
        return "jsonl"
    return None


def read_backend_object(obj: Any, where: str, format: str = "auto") -> list[BackendRecord]:
    """The generations in one object of a backend file. {"request": ..., "response": ...} pairs a response with
    the request that produced it (the prompt and the sampling parameters come from the request)."""
    if format not in FORMATS:
        raise BackendFileError(f"format: {format!r} is not one of {', '.join(FORMATS)}")
    if not isinstance(obj, dict):
        raise BackendFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    request = None
    if "response" in obj and isinstance(obj["response"], dict):
        request, obj = obj.get("request"), obj["response"]
        if request is not None and not isinstance(request, dict):
            raise BackendFileError(f"{where}: request: expected a JSON object")
    fmt = detect_format(obj) if format == "auto" else format
    if fmt is None:
        raise BackendFileError(f"{where}: not a format this reads (openai: choices[]; vllm: outputs[]; llama.cpp: "
                               f"completion_probabilities; tgi: details.tokens; jsonl: token_ids); keys: "
                               f"{', '.join(list(obj)[:8])}")
    if fmt in _SERVERS_WITH_OPENAI_ROUTES and "choices" in obj:
        fmt = "openai"
    return _READERS[fmt](obj, request, where)


def read_backend_file(path: str | Path, format: str = "auto") -> list[BackendRecord]:
    """Every generation in a backend file: JSONL (one response per line), a JSON array, or one JSON document."""
    records = []
    for where, obj in json_objects(Path(path), BackendFileError):
        records.extend(read_backend_object(obj, where, format))
    if not records:
        raise BackendFileError(f"{path}: no generations in the file")
    return records


__all__ = [
    "FORMATS",
    "Alternative",
    "BackendRecord",
    "BackendToken",
    "detect_format",
    "read_backend_file",
    "read_backend_object",
]
