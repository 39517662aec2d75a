"""generate(): a Workers AI text-generation request in, its result out, through the engine.

request dict -> prepare (validate, template, tokenize) -> engine (prefill, decode, sample) -> Response (text,
tool calls, JSON, usage) -> the output object, or Server-Sent Events bytes when stream is true.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from qwen_ref.engine import Engine
from qwen_ref.errors import InvalidInput
from qwen_ref.qwen import Qwen
from qwen_ref.workers_ai.limits import DEFAULT_LIMITS, Limits
from qwen_ref.workers_ai.output import Response
from qwen_ref.workers_ai.request import Prepared, prepare, samples


def generate(qwen: Qwen, inputs: dict[str, Any] | list[dict[str, Any]], *, n: int = 1, exact: bool = True,
             strict: bool = False, return_exceptions: bool = False, limits: Limits = DEFAULT_LIMITS,
             **engine_options: Any) -> Any:
    """A Workers AI request body in, its result out (or an iterator of SSE bytes when stream is true).

    A list of request bodies runs as one batch and returns a list of results, each with its own parameters
    and seed. With n > 1, one request is sampled n times: the prompt is prefilled once; sample i uses
    seed + i (or a fresh seed each without a seed). Returns a list.

    exact=True (the default): every request computes exactly what it computes alone, bit for bit. exact=False
    decodes the batch in one forward per step with BLAS: faster, but a batched matmul may round differently
    from a one-row matmul, so a seeded draw at a near-tie can differ.

    Keys the request schema does not know are ignored, as the service ignores them (Prepared.ignored lists
    them); strict=True makes each an InvalidInput naming it, for research use where a typo must not pass.
    limits: the request size limits (qwen_ref.workers_ai.limits.Limits), checked before any expensive work.

    A request that fails in the engine (its logits, its grammar, its adapter) fails alone: its typed error is
    raised once the batch has run, or, with return_exceptions=True, returned in its place in the list. A
    stream reports it in its final event. engine_options go to qwen_ref.engine.Engine (prefill_chunk,
    max_running, kv_memory).
    """
    if n != 1 or isinstance(n, bool):
        if isinstance(inputs, list):
            raise InvalidInput("/", "n", "n > 1 takes one request, not a batch")
        return _run(qwen, samples(qwen, inputs, n, strict=strict, limits=limits), exact, return_exceptions,
                    engine_options, shared=True)
    if isinstance(inputs, list):
        if not inputs:
            raise InvalidInput("/", "minItems", "a batch needs at least one request")
        batch = [prepare(qwen, body, where=f"/{i}", strict=strict, limits=limits) for i, body in enumerate(inputs)]
        for i, p in enumerate(batch):
            if p.stream:
                raise InvalidInput(f"/{i}/stream", "batch", "stream is not available in a batch; "
                                                            "send streamed requests one at a time")
        return _run(qwen, batch, exact, return_exceptions, engine_options)
    p = prepare(qwen, inputs, strict=strict, limits=limits)
    if p.stream:
        return _stream(qwen, p, exact, engine_options)
    return _run(qwen, [p], exact, False, engine_options)[0]


def _run(qwen: Qwen, batch: list[Prepared], exact: bool, return_exceptions: bool, engine_options: dict[str, Any],
         *, shared: bool = False) -> list[Any]:
    engine = Engine(qwen.model, exact=exact, **engine_options)
    responses = [Response(qwen.tokenizer, p) for p in batch]
    if shared:  # n samples of one prompt: one prefill
        engine.add(batch[0].engine_request(qwen), responses[0].push,
                   [(p.engine_request(qwen), r.push) for p, r in zip(batch[1:], responses[1:])])
    else:
        for p, r in zip(batch, responses):
            engine.add(p.engine_request(qwen), r.push)
    while engine.has_work():
        engine.step()
    out: list[Any] = []
    for r in responses:
        try:
            out.append(r.result())
        except Exception as e:
            if not return_exceptions:
                raise
            out.append(e)
    return out


def _stream(qwen: Qwen, p: Prepared, exact: bool, engine_options: dict[str, Any]) -> Iterator[bytes]:
    engine = Engine(qwen.model, exact=exact, **engine_options)
    events: list[Any] = []
    engine.add(p.engine_request(qwen), events.append)  # refusals (memory) raise here, before any iteration
    return _stream_steps(engine, Response(qwen.tokenizer, p), events)


def _stream_steps(engine: Engine, response: Response, events: list[Any]) -> Iterator[bytes]:
    while engine.has_work():
        engine.step()
        for event in events:
            yield from response.stream_events(event)
        events.clear()
