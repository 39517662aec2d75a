"""The Workers AI model ids this project speaks for, and what each maps to."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KnownModel:
    workers_ai_id: str
    hf_repo: str
    context_window: int
    takes_lora: bool


KNOWN_MODELS = {
    m.workers_ai_id: m
    for m in (
        KnownModel("@cf/qwen/qwen2.5-coder-32b-instruct", "Qwen/Qwen2.5-Coder-32B-Instruct", 32768, True),
        KnownModel("@cf/qwen/qwen1.5-0.5b-chat", "Qwen/Qwen1.5-0.5B-Chat", 32000, False),
    )
}


def lookup(workers_ai_id: str) -> KnownModel | None:
    return KNOWN_MODELS.get(workers_ai_id)
