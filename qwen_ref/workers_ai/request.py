"""A Workers AI request made ready for the engine: validated, templated, tokenized, checked against the model.

Every check runs before any compute, so a bad request never produces a partial result.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from typing import Any

from qwen_ref import lora, sampling
from qwen_ref.engine import EngineRequest
from qwen_ref.errors import ContextWindowExceeded, InvalidInput, InvalidSamplingParams, LoraUnavailable
from qwen_ref.qwen import Qwen
from qwen_ref.sampling import SAMPLING_FIELDS, RequestState, SamplingParams
from qwen_ref.sampling.json_mask import InvalidJsonSchema, JsonConstraint
from qwen_ref.workers_ai import template_worker
from qwen_ref.workers_ai.chat import ChatTemplateError, template_special_tokens
from qwen_ref.workers_ai.limits import DEFAULT_LIMITS, Limits, check_fits, check_limits
from qwen_ref.workers_ai.tools import (
    ToolSpecError,
    check_functions,
    forced_tools,
    normalize_tools,
    tool_call_grammar,
    tool_names,
)
from qwen_ref.workers_ai.validate import validate_input, with_defaults

MAX_SAMPLES = 1024


@dataclass
class Prepared:
    """One validated request, ready for the engine."""

    inputs: dict[str, Any]  # the body with the schema's defaults filled in
    prompt_ids: list[int]
    state: RequestState
    max_tokens: int
    constraint: Any = None  # qwen_ref.sampling.json_mask.JsonConstraint in JSON mode
    tool_names: set[str] = field(default_factory=set)
    adapter: Any = None  # the qwen_ref.lora.LoraAdapter applied to this request (unmerged); None: none
    ignored: list[str] = field(default_factory=list)  # JSON pointers of unknown keys left out (not strict)
    prompt_logprobs: int | None = None  # alternatives per prompt token: the prompt is scored (completions' echo)

    @property
    def stream(self) -> bool:
        return bool(self.inputs.get("stream"))

    @property
    def json_mode(self) -> bool:
        """response_format asks for JSON: the result's response is the parsed value (a tool-call grammar from
        tool_choice is a constraint too, but its output is read as tool calls)."""
        return self.inputs.get("response_format") is not None

    @property
    def logprobs(self) -> int | None:
        return self.inputs.get("logprobs")

    def engine_request(self, qwen: Qwen, deadline: float | None = None) -> EngineRequest:
        return EngineRequest(self.prompt_ids, self.max_tokens, self.state, frozenset(qwen.eos_token_ids),
                             self.constraint, self.adapter, self.logprobs, deadline, self.prompt_logprobs)


def context_window(qwen: Qwen) -> int:
    return qwen.known.context_window if qwen.known is not None else qwen.config.max_position_embeddings


def _bad(where: str, path: str, rule: str, detail: str) -> InvalidInput:
    """An InvalidInput whose path is prefixed with `where` (the request's index in a batch)."""
    return InvalidInput(where + path if path != "/" or not where else where, rule, detail)


def offered_tools(inputs: dict[str, Any], where: str = "") -> list[dict[str, Any]]:
    """The request's tools, normalized; none with tool_choice 'none' (the model is not shown them)."""
    try:
        check_functions(inputs.get("functions"))
        tools = normalize_tools(inputs.get("tools"))
    except ToolSpecError as e:
        raise _bad(where, "/tools" if "tools" in inputs else "/functions", "tools", str(e)) from None
    return [] if inputs.get("tool_choice") == "none" else tools


def prompt_text(qwen: Qwen, inputs: dict[str, Any], where: str = "") -> tuple[str, set[str]]:
    """The text the model reads, and the names of the offered tools."""
    tok = qwen.tokenizer
    tools = offered_tools(inputs, where)
    if "prompt" in inputs and inputs.get("raw"):
        return inputs["prompt"], tool_names(tools)
    messages = ([_with_call_objects(m) for m in inputs["messages"]] if "messages" in inputs
                else [{"role": "user", "content": inputs["prompt"]}])
    if tok.chat_template is None:
        raise _bad(where, "/", "chat_template", "the checkpoint has no chat template; send a prompt with raw: true")
    try:
        text = template_worker.render(tok.chat_template, messages, tools=tools or None, add_generation_prompt=True,
                                      special_tokens=template_special_tokens(tok.config))
    except ChatTemplateError as e:
        raise _bad(where, "/messages" if "messages" in inputs else "/prompt", "chat_template", str(e)) from None
    return text, tool_names(tools)


def _with_call_objects(message: dict[str, Any]) -> dict[str, Any]:
    """An assistant's earlier tool calls with their arguments as objects: OpenAI clients send the object's JSON
    text, and the chat templates render the arguments with tojson (a string would be quoted twice). Tool keys
    sent as null are left out, as if absent."""
    message = {k: v for k, v in message.items() if v is not None or k not in ("tool_calls", "tool_call_id", "name")}
    calls = message.get("tool_calls")
    if not calls:
        return message
    out = []
    for call in calls:
        fn = call.get("function", call)
        args = fn.get("arguments")
        if isinstance(args, str):
            with contextlib.suppress(ValueError):  # not JSON: the template shows the text as it was sent
                args = json.loads(args)
            fn = {**fn, "arguments": args}
            call = {**call, "function": fn} if "function" in call else fn
        out.append(call)
    return {**message, "tool_calls": out}


def prepare(qwen: Qwen, inputs: Any, where: str = "", *, strict: bool = False,
            prompt_ids: list[int] | None = None, max_tokens: int | None = None,
            limits: Limits = DEFAULT_LIMITS) -> Prepared:
    """strict=False (the service's behaviour): keys the schema does not know are ignored and listed in
    Prepared.ignored; strict=True: they are an InvalidInput naming them (for research, where a typo must not pass).
    prompt_ids: the prompt as token ids (OpenAI completions take them), used instead of tokenizing the body's.
    max_tokens: instead of the body's, which the schema keeps >= 1 (completions take 0: the prompt only).
    limits: the size limits (workers_ai/limits.py), checked first, before any expensive work."""
    ignored: list[str] = []
    try:
        chars = check_limits(inputs, limits)
        body = with_defaults(validate_input(inputs, strict=strict, ignored=ignored))
    except InvalidInput as e:
        raise _bad(where, e.path, e.rule, e.detail) from None
    adapter = _adapter(qwen, body.get("lora"), where)
    if qwen.tokenizer is None:
        raise _bad(where, "/", "tokenizer", "the checkpoint has no tokenizer files")
    max_tokens = body["max_tokens"] if max_tokens is None else max_tokens
    window = context_window(qwen)
    if prompt_ids is None:  # a text that cannot fit is refused before the template and the tokenizer run
        check_fits(chars, max_tokens, window, qwen.tokenizer.longest_token)
    text, names = prompt_text(qwen, body, where)
    if prompt_ids is None:
        prompt_ids = qwen.tokenizer.encode(text)
    elif any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < qwen.config.vocab_size
             for i in prompt_ids):
        raise _bad(where, "/prompt", "token_ids", f"token ids must be integers from 0 to "
                   f"{qwen.config.vocab_size - 1}, the model's vocabulary")
    if not prompt_ids:
        raise _bad(where, "/prompt", "minLength", "the prompt encodes to no tokens")
    if len(prompt_ids) + max_tokens > window:
        raise ContextWindowExceeded(
            f"This model's maximum context length is {window} tokens. However, you requested {max_tokens} "
            f"output tokens and your prompt contains {len(prompt_ids)} input tokens, for a total of "
            f"{len(prompt_ids) + max_tokens} tokens. Please reduce the length of the input prompt or max_tokens."
        )
    try:
        params = SamplingParams.from_dict({k: body[k] for k in SAMPLING_FIELDS if k in body})
    except InvalidSamplingParams as e:
        raise _bad(where, f"/{str(e).split(':', 1)[0]}", "range", str(e)) from None
    constraint = _constraint(qwen, body, where)
    return Prepared(body, prompt_ids, RequestState.start(params, prompt_ids), max_tokens, constraint, names,
                    adapter, [where + path for path in ignored])


def _constraint(qwen: Qwen, body: dict[str, Any], where: str) -> JsonConstraint | None:
    """Stage 0 of the sampler: JSON mode's grammar, or the tool-call grammar a forcing tool_choice asks for."""
    try:
        forced = forced_tools(offered_tools(body, where), body.get("tool_choice"))
    except ToolSpecError as e:
        path = "/tool_choice/function/name" if isinstance(body.get("tool_choice"), dict) else "/tool_choice"
        raise _bad(where, path, "tool_choice", str(e)) from None
    if forced is not None and body.get("response_format") is not None:
        raise _bad(where, "/tool_choice", "tool_choice", f"{json.dumps(body['tool_choice'])} forces a tool call, "
                   "so it cannot be combined with response_format")
    try:
        if forced is not None:
            return JsonConstraint.from_grammar(tool_call_grammar(forced, many=body["tool_choice"] == "required"),
                                               qwen.tokenizer, qwen.config.vocab_size, eos_ids=qwen.eos_token_ids,
                                               path="/tools")
        if body.get("response_format") is not None:
            return JsonConstraint.from_response_format(body["response_format"], qwen.tokenizer,
                                                       qwen.config.vocab_size, eos_ids=qwen.eos_token_ids)
    except InvalidJsonSchema as e:
        path = e.path if e.path == "/tools" else "/response_format" + e.path.removeprefix("/response_format")
        raise _bad(where, path, "json_schema", e.detail) from None
    return None


def _adapter(qwen: Qwen, name: str | None, where: str) -> Any:
    """The adapter a request's `lora` names (None: the model's default adapter, if it has one)."""
    if name is None:
        return qwen.default_adapter if qwen.adapters is not None else None
    model_id = qwen.known.workers_ai_id if qwen.known else "this model"
    if qwen.known is not None and not qwen.known.takes_lora:
        raise LoraUnavailable(f"The model {model_id} does not support LoRa inference")
    if qwen.adapters is None:
        raise LoraUnavailable(f"lora: {name!r}: no LoRA adapters are registered for {model_id} "
                              "(load it with lora_dir=DIR, or serve it with --lora-dir DIR)")
    try:
        adapter = qwen.adapters.get(name)
        lora.check_unmerged(qwen.model, adapter)
    except lora.LoraError as e:
        raise _bad(where, "/lora", "lora", str(e).removeprefix("lora: ")) from None
    return adapter


def samples(qwen: Qwen, inputs: Any, n: int, *, strict: bool = False, prompt_ids: list[int] | None = None,
            max_tokens: int | None = None, limits: Limits = DEFAULT_LIMITS) -> list[Prepared]:
    """n samples of one request: sample i uses seed + i (sampling.sample_seed), or a fresh seed each without a
    seed. They share one prompt, so the engine prefills it once."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SAMPLES:
        raise InvalidInput("/", "n", f"n: {n!r} is out of range; allowed: an integer from 1 to {MAX_SAMPLES}")
    first = prepare(qwen, inputs, strict=strict, prompt_ids=prompt_ids, max_tokens=max_tokens, limits=limits)
    if first.stream and n > 1:
        raise InvalidInput("/stream", "n", "stream is not available with n > 1")
    out = [first]
    for i in range(1, n):
        body = dict(first.inputs)
        if "seed" in inputs:
            body["seed"] = sampling.sample_seed(first.state.seed, i)
        else:
            body.pop("seed", None)  # a fresh seed per sample
        out.append(prepare(qwen, body, prompt_ids=prompt_ids, max_tokens=max_tokens, limits=limits))
    return out
