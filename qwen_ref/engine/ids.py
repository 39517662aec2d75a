"""Token ids in, token ids out, through the engine: for scripts, tests and benchmarks that work below the
Workers AI contract. Greedy unless sampling parameters are given; every row is its own request."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from qwen_ref.engine.engine import Engine
from qwen_ref.engine.sequence import EngineRequest, Failed, Token
from qwen_ref.errors import InvalidInput
from qwen_ref.models.qwen2 import QwenForCausalLM
from qwen_ref.sampling import RequestState


def generate_ids(model: QwenForCausalLM, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], *,
                 stop_ids: Sequence[int] = (), exact: bool = True,
                 params: Mapping[str, object] | Sequence[Mapping[str, object]] | None = None,
                 **engine_options: object) -> list[list[int]]:
    """The tokens each prompt produces (a stop id, when produced, is the last one). params: sampling fields
    (qwen_ref.sampling.SamplingParams), for every row or one mapping per row; default temperature 0 (greedy).
    Rows with the same prompt share one prefill (n samples of one prompt)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InvalidInput("/prompts", "minItems", "every prompt needs at least one token")
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(prompts) or any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in budgets):
        raise InvalidInput("/max_new_tokens", "minimum",
                           f"max_new_tokens {max_new_tokens!r} must be integers >= 0, one per prompt")
    per_row = list(params) if params is not None and not isinstance(params, Mapping) else [params] * len(prompts)
    if len(per_row) != len(prompts):
        raise InvalidInput("/params", "minItems", f"{len(per_row)} params for {len(prompts)} prompts")
    engine = Engine(model, exact=exact, **engine_options)
    outs: list[list[int]] = [[] for _ in prompts]
    failures: list[Exception] = []

    def sink(row: int):
        def take(event) -> None:
            if isinstance(event, Token):
                outs[row].append(event.token)
            elif isinstance(event, Failed):
                failures.append(event.error)
        return take

    groups: dict[tuple[int, ...], list[tuple[EngineRequest, object]]] = {}
    for row, (prompt, budget, p) in enumerate(zip(prompts, budgets, per_row)):
        if budget > 0:
            state = RequestState.start(dict(p) if p is not None else {"temperature": 0}, prompt)
            groups.setdefault(tuple(prompt), []).append((EngineRequest(list(prompt), budget, state,
                                                                       frozenset(stop_ids)), sink(row)))
    for (first, first_sink), *samples in groups.values():
        engine.add(first, first_sink, samples)
    while engine.has_work():
        engine.step()
    if failures:
        raise failures[0]
    return outs
