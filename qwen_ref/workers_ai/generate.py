"""generate(): the Workers AI text-generation contract on top of the model, the sampler and the decode loop.

request dict -> validate -> prompt (template, tokenize) -> decode loop -> text, tool calls, JSON, usage
-> output dict, or Server-Sent Events bytes when stream is true. Every check runs before any compute, so a
bad request never produces a partial result.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from qwen_ref.engine.decode import SamplingChooser, decode
from qwen_ref.errors import InvalidSamplingParams, QwenRefError
from qwen_ref.qwen import Qwen
from qwen_ref.sampling.sampler import SAMPLING_FIELDS, RequestState, SamplingParams
from qwen_ref.tokenizer.detok import IncrementalDetokenizer, detokenize
from qwen_ref.workers_ai.validate import InvalidInput, validate_input, with_defaults

PADDING = "abcdefghijklmnopqrstuvwxyz0123456789"


class ContextWindowExceeded(QwenRefError, ValueError):
    """prompt_tokens + max_tokens is more than the model's context window (HTTP 400 at the service)."""

    code = 400


class LoraUnavailable(QwenRefError, ValueError):
    """The request names a LoRA adapter the model cannot serve (Workers AI code 5005, HTTP 405)."""

    code = 5005


@dataclass
class Prepared:
    """One validated request, ready for the decode loop."""

    inputs: dict[str, Any]
    prompt_ids: list[int]
    state: RequestState
    max_tokens: int
    constraint: Any = None  # qwen_ref.constrain.JsonConstraint in JSON mode
    tool_names: set[str] = field(default_factory=set)
    adapter: Any = None  # the qwen_ref.lora.LoraAdapter the request names; None: the model's default

    @property
    def response_format(self) -> dict[str, Any] | None:
        return self.inputs.get("response_format")


def context_window(qwen: Qwen) -> int:
    return qwen.known.context_window if qwen.known is not None else qwen.config.max_position_embeddings


def _prefix(path: str, where: str) -> str:
    return where + path if path != "/" or not where else where


def _bad(where: str, path: str, rule: str, detail: str) -> InvalidInput:
    return InvalidInput(_prefix(path, where), rule, detail)


def prompt_text(qwen: Qwen, inputs: dict[str, Any], where: str = "") -> tuple[str, set[str]]:
    """The text the model reads, and the names of the offered tools."""
    from qwen_ref.workers_ai.chat import ChatTemplateError, render_chat, template_special_tokens
    from qwen_ref.workers_ai.tools import ToolSpecError, check_functions, normalize_tools, tool_names

    tok = qwen.tokenizer
    try:
        check_functions(inputs.get("functions"))
        tools = normalize_tools(inputs.get("tools"))
    except ToolSpecError as e:
        raise _bad(where, "/tools" if "tools" in inputs else "/functions", "tools", str(e)) from None
    if "prompt" in inputs and inputs.get("raw"):
        return inputs["prompt"], tool_names(tools)
    messages = inputs["messages"] if "messages" in inputs else [{"role": "user", "content": inputs["prompt"]}]
    if tok.chat_template is None:
        raise _bad(where, "/", "chat_template",
                   f"the checkpoint {qwen.path} has no chat template; send a prompt with raw: true")
    try:
        text = render_chat(tok.chat_template, messages, tools=tools or None, add_generation_prompt=True,
                           special_tokens=template_special_tokens(tok.config))
    except ChatTemplateError as e:
        raise _bad(where, "/messages" if "messages" in inputs else "/prompt", "chat_template", str(e)) from None
    return text, tool_names(tools)


def prepare(qwen: Qwen, inputs: Any, where: str = "") -> Prepared:
    try:
        body = with_defaults(validate_input(inputs))
    except InvalidInput as e:
        raise _bad(where, e.path, e.rule, e.detail) from None
    adapter = _adapter(qwen, body.get("lora"), where)
    if qwen.tokenizer is None:
        raise _bad(where, "/", "tokenizer", f"the checkpoint {qwen.path} has no tokenizer files")
    text, names = prompt_text(qwen, body, where)
    prompt_ids = qwen.tokenizer.encode(text)
    if not prompt_ids:
        raise _bad(where, "/prompt", "minLength", "the prompt encodes to no tokens")
    max_tokens = body["max_tokens"]
    window = context_window(qwen)
    if len(prompt_ids) + max_tokens > window:
        raise ContextWindowExceeded(
            f"This model's maximum context length is {window} tokens. However, you requested {max_tokens} "
            f"output tokens and your prompt contains {len(prompt_ids)} input tokens, for a total of "
            f"{len(prompt_ids) + max_tokens} tokens. Please reduce the length of the input prompt or max_tokens."
        )
    try:
        params = SamplingParams.from_dict({k: body[k] for k in SAMPLING_FIELDS if k in body})
    except InvalidSamplingParams as e:
        field_name = str(e).split(":", 1)[0]
        raise _bad(where, f"/{field_name}", "range", str(e)) from None
    constraint = None
    if body.get("response_format") is not None:
        from qwen_ref.sampling.json_mask import InvalidJsonSchema, JsonConstraint

        try:
            constraint = JsonConstraint.from_response_format(body["response_format"], qwen.tokenizer,
                                                             qwen.config.vocab_size, eos_ids=qwen.eos_token_ids)
        except InvalidJsonSchema as e:
            raise _bad(where, "/response_format" + e.path.removeprefix("/response_format"), "json_schema",
                       e.detail) from None
    return Prepared(body, prompt_ids, RequestState.start(params, prompt_ids), max_tokens, constraint, names,
                    adapter)


def _adapter(qwen: Qwen, name: str | None, where: str) -> Any:
    if name is None:
        return None
    model_id = qwen.known.workers_ai_id if qwen.known else str(qwen.path)
    if qwen.known is not None and not qwen.known.takes_lora:
        raise LoraUnavailable(f"The model {model_id} does not support LoRa inference")
    if qwen.adapters is None:
        raise LoraUnavailable(f"lora: {name!r}: no LoRA adapters are registered for {model_id} "
                              "(load it with lora_dir=DIR, or serve it with --lora-dir DIR)")
    from qwen_ref.lora.core import LoraError

    try:
        return qwen.adapters.get(name)
    except LoraError as e:
        raise _bad(where, "/lora", "lora", str(e).removeprefix("lora: ")) from None


def batch_adapter(batch: Sequence[Prepared]) -> Any:
    """The one adapter a batch names (None: the default); a batch runs with one set of merged weights."""
    wanted = {id(p.adapter): p.adapter for p in batch}
    if len(wanted) > 1:
        raise InvalidInput("/", "lora", "the requests of one batch name different LoRA adapters; "
                                        "send requests for different adapters in separate calls")
    return next(iter(wanted.values()))


def activate_adapter(qwen: Qwen, batch: Sequence[Prepared]) -> None:
    """Merge the adapter the batch needs (the one its requests name, else the load-time default)."""
    adapter = batch_adapter(batch)
    if qwen.adapters is not None:  # else only the load-time adapter (if any) exists, and it stays merged
        qwen.adapters.activate(qwen.model, adapter if adapter is not None else qwen.default_adapter)


@dataclass
class Finished:
    tokens: list[int]
    text: str


def _usage(p: Prepared, completion: int) -> dict[str, int]:
    return {"prompt_tokens": len(p.prompt_ids), "completion_tokens": completion,
            "total_tokens": len(p.prompt_ids) + completion}


def logprob_records(qwen: Qwen, infos: list[Any]) -> list[dict[str, Any]]:
    """The `logprobs` extension: per generated token its log-probability under the model's raw distribution
    and under the final sampling distribution, with the N best alternatives of each."""
    tok = qwen.tokenizer

    def alternatives(pairs) -> list[dict[str, Any]]:
        return [{"id": i, "text": tok.decode([i]), "logprob": lp} for i, lp in pairs]

    return [{"id": info.token, "text": tok.decode([info.token]), "logprob": info.raw,
             "sampling_logprob": info.final, "top_logprobs": alternatives(info.raw_top),
             "top_sampling_logprobs": alternatives(info.final_top)} for info in infos]


def shape_output(qwen: Qwen, p: Prepared, tokens: list[int], infos: list[Any] | None = None) -> dict[str, Any]:
    """The non-stream result object for one finished request."""
    from qwen_ref.workers_ai.tools import parse_tool_calls

    text = detokenize(qwen.tokenizer, tokens)
    out: dict[str, Any] = {}
    if p.constraint is not None:
        p.constraint.require_complete()  # raises JsonModeNotMet ("JSON Mode couldn't be met")
        out["response"] = p.constraint.result(text)
    else:
        content, calls = parse_tool_calls(text, p.tool_names or None)
        out["response"] = content
        if calls:
            out["tool_calls"] = calls
    out["usage"] = _usage(p, len(tokens))
    if p.inputs.get("logprobs") is not None:
        out["logprobs"] = logprob_records(qwen, infos or [])
    return out


def _run(qwen: Qwen, batch: Sequence[Prepared], exact: bool = True) -> Iterator[tuple[int, int, Any]]:
    """(row, token, logprobs info or None) for every token the batch produces, in decoding order."""
    activate_adapter(qwen, batch)
    wanted = [p.inputs.get("logprobs") for p in batch]
    n = max((w for w in wanted if w is not None), default=None)
    chooser = SamplingChooser([p.state for p in batch], [p.constraint for p in batch], logprobs=n)
    for step in decode(qwen.model, [p.prompt_ids for p in batch], [p.max_tokens for p in batch],
                       choose=chooser, stop_ids=qwen.eos_token_ids, batch_invariant=exact):
        infos = chooser.last_logprobs
        for row, token in enumerate(step.tokens):
            if token is not None:
                info = None
                if infos is not None and wanted[row] is not None:
                    info = _trim(infos[row], wanted[row])
                yield row, token, info


def _trim(info: Any, n: int) -> Any:
    """A batch computes the largest N asked for; each request keeps its own N."""
    from dataclasses import replace

    return replace(info, raw_top=info.raw_top[:n], final_top=info.final_top[:n])


def _finish_batch(qwen: Qwen, batch: list[Prepared], exact: bool) -> list[dict[str, Any]]:
    outputs: list[list[int]] = [[] for _ in batch]
    infos: list[list[Any]] = [[] for _ in batch]
    for row, token, info in _run(qwen, batch, exact):
        outputs[row].append(token)
        if info is not None:
            infos[row].append(info)
    return [shape_output(qwen, p, toks, inf) for p, toks, inf in zip(batch, outputs, infos)]


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


def _padding() -> str:
    # random-length padding on every chunk, as the service adds against token-length side channels
    n = 1 + secrets.randbelow(len(PADDING) + 12)
    return (PADDING * 2)[:n]


def _stream(qwen: Qwen, p: Prepared) -> Iterator[bytes]:
    from qwen_ref.workers_ai.tools import parse_tool_calls

    detok = IncrementalDetokenizer(qwen.tokenizer)
    tokens: list[int] = []
    pending: list[Any] = []  # logprobs of tokens whose text is not out yet (a held-back partial character)
    with_logprobs = p.inputs.get("logprobs") is not None

    def event(text: str) -> dict[str, Any]:
        e: dict[str, Any] = {"response": text, "p": _padding()}
        if with_logprobs:
            e["logprobs"] = logprob_records(qwen, pending)
            pending.clear()
        return e

    for _, token, info in _run(qwen, [p]):
        tokens.append(token)
        if info is not None:
            pending.append(info)
        chunk = detok.push(token)
        if chunk:
            yield _sse(event(chunk))
    tail = detok.flush()
    if tail:
        yield _sse(event(tail))
    final: dict[str, Any] = {"response": "", "usage": _usage(p, len(tokens))}
    if with_logprobs and pending:
        final["logprobs"] = logprob_records(qwen, pending)
    if p.constraint is not None:
        if not p.constraint.is_complete():
            final["error"] = "JSON Mode couldn't be met"
    else:
        _, calls = parse_tool_calls(detokenize(qwen.tokenizer, tokens), p.tool_names or None)
        if calls:
            final["tool_calls"] = calls
    yield _sse(final)
    yield b"data: [DONE]\n\n"


SEED_MAX = 9999999999


def sample_seed(seed: int, i: int) -> int:
    """The seed of sample i of a request with `seed` (n > 1): seed, seed + 1, ... wrapping inside 1..SEED_MAX."""
    return (seed - 1 + i) % SEED_MAX + 1


def _samples(qwen: Qwen, inputs: Any, n: int) -> list[Prepared]:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1024:
        raise InvalidInput("/", "n", f"n: {n!r} is out of range; allowed: an integer from 1 to 1024")
    first = prepare(qwen, inputs)
    if first.inputs.get("stream") and n > 1:
        raise InvalidInput("/stream", "n", "stream is not available with n > 1")
    out = [first]
    for i in range(1, n):
        body = dict(first.inputs)
        if "seed" in inputs:
            body["seed"] = sample_seed(first.state.seed, i)
        else:
            body.pop("seed", None)  # a fresh seed per sample
        p = prepare(qwen, body)
        out.append(p)
    return out


def generate(qwen: Qwen, inputs: dict[str, Any] | list[dict[str, Any]], *, n: int = 1, exact: bool = True) -> Any:
    """A Workers AI request body in, its result out (or an iterator of SSE bytes when stream is true).

    A list of request bodies runs as one batch and returns a list of results, each with its own parameters
    and seed. With n > 1, one request is sampled n times: the prompt is prefilled once; sample i uses
    seed + i (or a fresh seed each without a seed). Returns a list.

    exact=True (the default): every row runs the arithmetic it runs alone, so each result equals the request
    run alone, bit for bit. exact=False decodes the rows in one batched forward: faster, but a batched
    matmul may round differently from a one-row matmul, so a seeded draw at a near-tie can differ.
    """
    if n != 1 or isinstance(n, bool):
        if isinstance(inputs, list):
            raise InvalidInput("/", "n", "n > 1 takes one request, not a batch")
        return _finish_batch(qwen, _samples(qwen, inputs, n), exact)
    if isinstance(inputs, list):
        if not inputs:
            raise InvalidInput("/", "minItems", "a batch needs at least one request")
        batch = [prepare(qwen, body, where=f"/{i}") for i, body in enumerate(inputs)]
        batch_adapter(batch)  # before any work
        for i, p in enumerate(batch):
            if p.inputs.get("stream"):
                raise InvalidInput(f"/{i}/stream", "batch", "stream is not available in a batch; "
                                                            "send streamed requests one at a time")
        return _finish_batch(qwen, batch, exact)
    p = prepare(qwen, inputs)
    if p.inputs.get("stream"):
        return _stream(qwen, p)
    tokens, infos_one = [], []
    for _, token, info in _run(qwen, [p]):
        tokens.append(token)
        if info is not None:
            infos_one.append(info)
    return shape_output(qwen, p, tokens, infos_one)
