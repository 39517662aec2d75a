"""Chat templates rendered exactly as transformers' `apply_chat_template(..., tokenize=False)` renders them.

The environment is transformers' (transformers/utils/chat_template_utils.py, v5): a sandboxed, immutable jinja2
environment with trim_blocks and lstrip_blocks, the loopcontrols extension, a `{% generation %}` tag, a `tojson`
filter that does not escape HTML or non-ASCII text and keeps key order, and the globals `raise_exception`,
`strftime_now`, `dict` and `namespace`. The template sees `messages`, `tools`, `documents` (always None here),
`add_generation_prompt` and the tokenizer's named special tokens (`eos_token`, `pad_token`, ...).
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.filters
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from qwen_ref.errors import QwenRefError

# The named special tokens transformers passes to a template (PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Message fields under which a message's reasoning may arrive; transformers fills in all of them from the first.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_RESERVED_NAMES = frozenset({"messages", "tools", "documents", "add_generation_prompt"})
_TEMPLATE_FILENAME = "<template>"  # what jinja names a template made by from_string in rewritten tracebacks


class ChatTemplateError(QwenRefError, ValueError):
    """A chat template does not compile, raises, or fails while rendering the given messages."""


class TemplateRaisedError(ChatTemplateError):
    """The template called raise_exception(message): it rejects the conversation it was given."""


def _raise_exception(message: Any) -> None:
    raise TemplateRaisedError(str(message))


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | str | None = None, separators: Any = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    # `dict(...)` inside a template, without exposing the dict type itself
    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    # jinja's namespace(), refusing underscore-prefixed attribute names as transformers does
    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}"
            )


class _GenerationTag(jinja2.ext.Extension):
    # transformers' `{% generation %}...{% endgeneration %}` marks assistant text for its token masks; rendering
    # a string only needs the body.
    tags = {"generation"}  # noqa: RUF012  (jinja reads this class attribute)

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


# ------------------------------------------------------------------------------------------------------------
# Bounds: a template is operator-supplied code, run once per request. Its rendering may take at most
# RENDER_TIMEOUT_S (a tracer on the template's own lines checks the clock, so even a loop that calls nothing is
# stopped) and write at most MAX_RENDER_CHARS; the operations that can build a huge value in one step (repeating a
# string or list, padding to a width, replace, join, powers) are checked before they run.

MAX_RENDER_CHARS = 16_000_000
RENDER_TIMEOUT_S = 5.0
# a %-conversion ("%-10.3f", "%*d") and a format field's spec ("{:>10}", "{0:{1}}"): the numbers in them are
# widths and precisions, and a "*" or a nested "{...}" takes one from the arguments
_PERCENT = re.compile(r"%[#0\- +]*(?:\*|\d*)(?:\.(?:\*|\d*))?[a-zA-Z%]")
_FIELD = re.compile(r"\{[^{}]*?:((?:[^{}]|\{[^{}]*\})*)\}")


class TemplateLimitError(ChatTemplateError):
    """The template ran past its time or size bound."""


def _too_big(size: int) -> None:
    if size > MAX_RENDER_CHARS:
        raise TemplateLimitError(f"the chat template builds a value of {size} characters or items; at most "
                                 f"{MAX_RENDER_CHARS}")


def _check_widths(fmt: Any, args: Any = ()) -> None:
    """The widths and precisions a format string asks for, its own and those taken from the arguments."""
    if not isinstance(fmt, str):
        return
    specs = [m.group(0) for m in _PERCENT.finditer(fmt)] + [m.group(1) for m in _FIELD.finditer(fmt)]
    for spec in specs:
        for number in re.findall(r"\d+", spec):
            _too_big(int(number))
    if any("*" in spec or "{" in spec for spec in specs):
        values = args.values() if isinstance(args, Mapping) else args if isinstance(args, (list, tuple)) else (args,)
        for value in values:
            if isinstance(value, int) and not isinstance(value, bool):
                _too_big(value)


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, list, tuple)) else 0


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "%"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if _size(seq) and isinstance(n, int):
                    _too_big(_size(seq) * n)
        elif operator == "**" and isinstance(right, int) and abs(right) > 4096 and left not in (0, 1, -1):
            raise TemplateLimitError(f"the chat template raises a number to the power {right}")
        elif operator == "%":
            _check_widths(left, right)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # jinja's parameter names
        owner = getattr(__obj, "__self__", None)
        name = getattr(__obj, "__name__", "")
        if isinstance(owner, str):
            if name in ("center", "ljust", "rjust", "zfill") and args and isinstance(args[0], int):
                _too_big(args[0])
            elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
                _too_big(len(owner) + (owner.count(args[0]) if args[0] else len(owner) + 1) * len(args[1]))
            elif name == "expandtabs":
                _too_big(len(owner) * (args[0] if args and isinstance(args[0], int) else 8))
        result = ImmutableSandboxedEnvironment.call(__self, __context, __obj, *args, **kwargs)
        _too_big(_size(result))
        return result

    def wrap_str_format(self, value: Any) -> Any:
        # str.format / format_map reach templates through this wrapper (not call): widths are checked, in the
        # format string and among the arguments (a nested width such as "{:{}}")
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None

        def bounded(*args: Any, **kwargs: Any) -> str:
            _check_widths(value.__self__, (*args, *kwargs.values()))
            return wrapped(*args, **kwargs)

        return bounded


def _bounded_filter(name: str) -> Any:
    original = jinja2.filters.FILTERS[name]
    passed = getattr(original, "jinja_pass_arg", None)  # the environment or context jinja passes first

    def bounded(*args: Any, **kwargs: Any) -> Any:
        lead = 1 if passed is not None else 0
        value, rest = args[lead], args[lead + 1 :]
        if name == "format":
            _check_widths(value, rest)
        else:  # center(width), indent(width), wordwrap(width): at most width more characters a line
            width = kwargs.get("width", rest[0] if rest else 0)
            if isinstance(width, str):
                width = len(width)
            if isinstance(width, int):
                _too_big(len(str(value)) + width * (str(value).count("\n") + 1))
        result = original(*args, **kwargs)
        _too_big(_size(result))
        return result

    if passed is not None:
        bounded.jinja_pass_arg = passed  # type: ignore[attr-defined]
    return bounded


class _Deadline:
    """A tracer on the template's compiled lines: past the deadline it raises inside the template."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds
        self.seconds = seconds
        self.lines = 0

    def __call__(self, frame: Any, event: str, arg: Any) -> Any:
        return self._line if frame.f_code.co_filename == _TEMPLATE_FILENAME else None

    def _line(self, frame: Any, event: str, arg: Any) -> Any:
        self.lines += 1
        if self.lines % 256 == 0 and time.monotonic() > self.end:
            raise TemplateLimitError(f"the chat template ran past its time bound of {self.seconds:g}s")
        return self._line


def _render_bounded(compiled: jinja2.Template, variables: dict[str, Any]) -> str:
    pieces, size = [], 0
    tracer, previous = _Deadline(RENDER_TIMEOUT_S), sys.gettrace()
    sys.settrace(tracer)
    try:
        for piece in compiled.generate(**variables):
            size += len(piece)
            _too_big(size)
            pieces.append(piece)
            if time.monotonic() > tracer.end:
                raise TemplateLimitError(f"the chat template ran past its time bound of {RENDER_TIMEOUT_S:g}s")
    finally:
        sys.settrace(previous)
    return "".join(pieces)


def _environment() -> ImmutableSandboxedEnvironment:
    env = _BoundedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    for name in ("center", "indent", "wordwrap", "format"):
        env.filters[name] = _bounded_filter(name)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


_ENV = _environment()


@lru_cache(maxsize=64)
def compile_template(template: str) -> jinja2.Template:
    """The compiled template, cached by its text."""
    if not isinstance(template, str):
        raise ChatTemplateError(f"a chat template must be a string, got {type(template).__name__}")
    try:
        return _ENV.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template syntax error at line {e.lineno}: {e.message}") from None


def template_special_tokens(tokenizer_config: Mapping[str, Any]) -> dict[str, str]:
    """The special-token variables transformers gives a template, from a tokenizer_config.json object: the named
    tokens that are set (a string, or an AddedToken object's "content"), plus the names of a dict-valued
    `extra_special_tokens` (model-specific named tokens)."""
    named: dict[str, Any] = {name: tokenizer_config.get(name) for name in SPECIAL_TOKEN_NAMES}
    extra = tokenizer_config.get("extra_special_tokens")
    if isinstance(extra, Mapping):
        named.update(extra)
    tokens = {}
    for name, value in named.items():
        if isinstance(value, Mapping):
            value = value.get("content")
        if isinstance(value, str):
            tokens[name] = value
    return tokens


def _plain(value: Any) -> Any:
    # transformers rebuilds everything a template sees from plain JSON types; other objects become "<TypeName>"
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


def _prepare_messages(messages: Sequence[Any]) -> list[dict[str, Any]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(f"messages must be a list of message objects, got {type(messages).__name__}")
    if not messages:
        raise ChatTemplateError("cannot apply a chat template to an empty conversation: give at least one message")
    prepared = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"messages[{i}] must be an object, got {type(message).__name__}")
        # As transformers: keys whose value is None are dropped (OpenAI-style content=None, tool_calls=None).
        message = _plain({k: v for k, v in message.items() if v is not None})
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        prepared.append(message)
    return prepared


def _prepare_special_tokens(special_tokens: Mapping[str, Any] | None) -> dict[str, Any]:
    if special_tokens is None:
        return {}
    clash = sorted(_RESERVED_NAMES.intersection(special_tokens))
    if clash:
        raise ChatTemplateError(f"special_tokens may not set the template variables {', '.join(clash)}")
    return _plain(dict(special_tokens))


def _where(error: BaseException) -> str:
    # " at line N" of the innermost template frame in the traceback jinja rewrote, or ""
    line, tb = None, error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == _TEMPLATE_FILENAME:
            line = tb.tb_lineno
        tb = tb.tb_next
    return "" if line is None else f" at line {line}"


def render_chat(
    template: str,
    messages: list[dict],
    *,
    tools: list[dict] | None = None,
    add_generation_prompt: bool = True,
    special_tokens: dict | None = None,
) -> str:
    """The prompt text for `messages` (and `tools`, passed to the template as given), as transformers renders it."""
    compiled = compile_template(template)
    chat = _prepare_messages(messages)
    if tools is not None and not (isinstance(tools, Sequence) and not isinstance(tools, (str, bytes))):
        raise ChatTemplateError(f"tools must be a list of tool objects or None, got {type(tools).__name__}")
    for i, tool in enumerate(tools or ()):
        if not isinstance(tool, Mapping):
            raise ChatTemplateError(f"tools[{i}] must be an object, got {type(tool).__name__}")
    variables = _prepare_special_tokens(special_tokens)
    try:
        return _render_bounded(compiled, {"messages": chat, "tools": _plain(tools), "documents": None,
                                          "add_generation_prompt": bool(add_generation_prompt), **variables})
    except TemplateLimitError as e:
        raise TemplateLimitError(f"{e}{_where(e)}") from None
    except TemplateRaisedError as e:
        raise TemplateRaisedError(f"the chat template rejected the conversation{_where(e)}: {e}") from None
    except (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError, ArithmeticError,
            RecursionError, MemoryError) as e:
        raise ChatTemplateError(f"chat template failed{_where(e)}: {type(e).__name__}: {e}") from None
