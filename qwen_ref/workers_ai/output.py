"""The contract's output, in one place: the result object, the stream's events (with the service's `p` padding),
usage, tool calls, logprobs and the JSON-mode failure. generate() and the server both shape through here.

A Response follows one request's engine events. Non-stream: `result()` once it has finished. Stream:
`stream_events(event)` gives the SSE bytes each engine event produces, ending with the final event and [DONE].
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Sequence
from typing import Any

from qwen_ref.engine import Event, Failed, Finished, Prompt, Token
from qwen_ref.errors import JSON_MODE_NOT_MET, QwenRefError
from qwen_ref.sampling import ForcedLogprobs, TokenLogprobs
from qwen_ref.tokenizer import IncrementalDetokenizer, QwenTokenizer, detokenize
from qwen_ref.workers_ai.request import Prepared
from qwen_ref.workers_ai.tools import TOOL_CALL_OPEN, parse_tool_calls

PADDING = "abcdefghijklmnopqrstuvwxyz0123456789"
DONE = b"data: [DONE]\n\n"


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


def padding() -> str:
    # random-length padding on every chunk, as the service adds against token-length side channels
    return (PADDING * 2)[: 1 + secrets.randbelow(len(PADDING) + 12)]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def logprob_records(tokenizer: QwenTokenizer, infos: list[TokenLogprobs]) -> list[dict[str, Any]]:
    """The `logprobs` extension: per generated token its log-probability under the model's raw distribution
    and under the final sampling distribution, with the N best alternatives of each."""

    def alternatives(pairs) -> list[dict[str, Any]]:
        return [{"id": i, "text": tokenizer.decode([i]), "logprob": lp} for i, lp in pairs]

    return [{"id": info.token, "text": tokenizer.decode([info.token]), "logprob": info.raw,
             "sampling_logprob": info.final, "top_logprobs": alternatives(info.raw_top),
             "top_sampling_logprobs": alternatives(info.final_top)} for info in infos]


def _partial_stop(text: str, stops: Sequence[str]) -> int:
    """The length of the longest end of text that is the start of a stop string (it may still become one)."""
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if s.startswith(text[-n:])),
               default=0)


class Response:
    def __init__(self, tokenizer: QwenTokenizer, prepared: Prepared, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.prepared = prepared
        # stop strings (OpenAI's `stop`): matched on the decoded text; the match and what follows are not returned,
        # and the request is stopped in the engine through `cancel`, which whoever runs the request sets
        self.stop = tuple(s for s in stop if s)
        self.cancel: Callable[[], None] = lambda: None
        self._text = ""  # the decoded text so far
        self._given = 0  # how much of it push() has handed out
        self._cut: int | None = None  # where the first stop string starts in it
        self.tokens: list[int] = []
        self.infos: list[TokenLogprobs] = []
        self.prompt_infos: list[ForcedLogprobs] = []  # the prompt's tokens after the first, with prompt_logprobs
        self.reason: str | None = None  # "stop" or "length" once finished
        self.error: QwenRefError | None = None
        self._detok = IncrementalDetokenizer(tokenizer)
        self._pending: list[TokenLogprobs] = []  # logprobs of tokens whose text is not out yet
        self._held = ""  # text held back from a stream with tools offered: a tool call, or a possible start of one
        self._in_call = False
        self._streamed = ""

    def push(self, event: Event) -> str:
        """Take one engine event; the text it completes (a partial UTF-8 character, or a possible start of a stop
        string, waits for its next characters)."""
        if self.done:
            return ""  # stopped at a stop string: whatever the engine still sends is not part of the answer
        if isinstance(event, Prompt):
            self.prompt_infos = list(event.logprobs)
            return ""
        if isinstance(event, Token):
            self.tokens.append(event.token)
            if event.logprobs is not None:
                self.infos.append(event.logprobs)
                self._pending.append(event.logprobs)
            return self._release(self._detok.push(event.token), final=False)
        if isinstance(event, Finished):
            text = self._release(self._detok.flush(), final=True)
            self.reason = self.reason or event.reason
            return text
        assert isinstance(event, Failed)
        self.error = event.error
        return ""

    def _release(self, text: str, final: bool) -> str:
        self._text += text
        if not self.stop:
            self._given = len(self._text)
            return text
        found = [i for i in (self._text.find(s, max(0, self._given - len(s) + 1)) for s in self.stop) if i >= 0]
        if found:
            self._cut, self.reason = min(found), "stop"
            self.cancel()
            end = self._cut
        else:  # a suffix that may be the start of a stop string waits, unless nothing more comes
            end = len(self._text) if final else len(self._text) - _partial_stop(self._text, self.stop)
        out, self._given = self._text[self._given : max(end, self._given)], max(end, self._given)
        return out

    @property
    def done(self) -> bool:
        return self.reason is not None or self.error is not None

    @property
    def text(self) -> str:
        """The generated text as decoded, up to a stop string (tool-call blocks still in it; JSON mode: the JSON
        text)."""
        return detokenize(self.tokenizer, self.tokens)[: self._cut]

    def tool_calls(self) -> list[dict[str, Any]]:
        if self.prepared.json_mode:
            return []
        return parse_tool_calls(self.text, self.prepared.tool_names or None)[1]

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.tool_calls() else self.reason or "stop"

    def usage(self) -> dict[str, int]:
        return usage(len(self.prepared.prompt_ids), len(self.tokens))

    def result(self) -> dict[str, Any]:
        """The non-stream result object. Raises the request's error, or JsonModeNotMet for incomplete JSON."""
        if self.error is not None:
            raise self.error
        out: dict[str, Any] = {}
        if self.prepared.json_mode:
            self.prepared.constraint.require_complete()
            out["response"] = self.prepared.constraint.result(self.text)
        else:
            content, calls = parse_tool_calls(self.text, self.prepared.tool_names or None)
            out["response"] = content
            if calls:
                out["tool_calls"] = calls
        out["usage"] = self.usage()
        if self.prepared.logprobs is not None:
            out["logprobs"] = logprob_records(self.tokenizer, self.infos)
        return out

    # ------------------------------------------------------------------------------------------ the stream

    def stream_events(self, event: Event) -> list[bytes]:
        """The SSE bytes one engine event produces: a padded text event when text may be shown, and after the
        last event the final one (usage, tool calls or the JSON-mode failure, or the request's error) and
        [DONE]. With tools offered, tool-call markup is never shown as text: the final event carries the calls."""
        text = self.shown(event)
        out = [sse(self._text_event(text))] if text else []
        if self.done:
            out += [sse(self.final_event()), DONE]
        return out

    def shown(self, event: Event) -> str:
        """push(event), with the text a stream may show: with tools offered, text from a `<tool_call>` on is held
        back (and a possible start of one waits for its next characters); at the end, whatever held text is not
        a tool call (the text after the calls, or markup that did not parse) comes out."""
        text = self.push(event)
        if self.prepared.tool_names:
            text = self._outside_calls(text)
            if self.done:
                text += self._after_calls()
        return text

    def _outside_calls(self, text: str) -> str:
        if self._in_call:
            self._held += text
            return ""
        buffer = self._held + text
        start = buffer.find(TOOL_CALL_OPEN)
        if start >= 0:
            self._in_call, out, self._held = True, buffer[:start], buffer[start:]
        else:
            keep = next((n for n in range(min(len(buffer), len(TOOL_CALL_OPEN) - 1), 0, -1)
                         if TOOL_CALL_OPEN.startswith(buffer[-n:])), 0)
            out, self._held = buffer[: len(buffer) - keep], buffer[len(buffer) - keep :]
        self._streamed += out
        return out

    def _after_calls(self) -> str:
        held, self._held = self._held, ""
        if not self._in_call:
            return held  # a partial '<tool_call' that never completed is plain text
        content, calls = parse_tool_calls(self.text, self.prepared.tool_names)
        if not calls:
            return held  # markup that did not parse as a call is shown as it was generated
        before = self._streamed.strip()
        return content[len(before):] if content.startswith(before) else ""

    def take_pending(self) -> list[TokenLogprobs]:
        """The logprobs of the tokens whose text has come out since the last call (a stream's event carries them)."""
        pending, self._pending = self._pending, []
        return pending

    def _text_event(self, text: str) -> dict[str, Any]:
        e: dict[str, Any] = {"response": text, "p": padding()}
        if self.prepared.logprobs is not None:
            e["logprobs"] = logprob_records(self.tokenizer, self.take_pending())
        return e

    def final_event(self, error: str | None = None) -> dict[str, Any]:
        """The stream's last event before [DONE]; `error` (or the request's own) ends the stream early."""
        final: dict[str, Any] = {"response": "", "usage": self.usage()}
        if self.prepared.logprobs is not None and self._pending:
            final["logprobs"] = logprob_records(self.tokenizer, self.take_pending())
        if error is None and self.error is not None:
            error = str(self.error)
        if error is not None:
            final["error"] = error
        elif self.prepared.json_mode:
            if not self.prepared.constraint.is_complete():
                final["error"] = JSON_MODE_NOT_MET
        elif calls := self.tool_calls():
            final["tool_calls"] = calls
        return final
