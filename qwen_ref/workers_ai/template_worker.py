"""Chat templates rendered in a worker process with its own memory and time limits.

A template is code from the checkpoint, and the request chooses its data. render_chat's checks (chat.py) stop
the runaway cases they know, but Jinja has more ways to build a huge value in one step than any list of checks
covers. So the one render path, `render(...)`, runs render_chat in a child process whose address space is
capped (RLIMIT_AS) and which is killed past a deadline: whatever a template does, the request gets a typed
error in bounded time, and the server's own memory is never touched. The child imports jinja2 and this
package's chat module only (no torch), starts once (about 0.1 s) and serves renders one at a time over a pipe:
a 4-byte length and a JSON object each way.

    python -m qwen_ref.workers_ai.template_worker     # what the parent starts; it exits when its stdin closes
"""

from __future__ import annotations

import atexit
import json
import os
import select
import struct
import subprocess
import sys
import threading
from typing import Any, BinaryIO

from qwen_ref.workers_ai.chat import (
    RENDER_TIMEOUT_S,
    ChatTemplateError,
    TemplateLimitError,
    TemplateRaisedError,
    render_chat,
)

MEMORY_LIMIT_BYTES = 2 * 2**30  # the child's whole address space (Python and jinja2 take about 60 MB of it)
KILL_AFTER_S = RENDER_TIMEOUT_S + 5.0  # the child's own bound stops a template first; this is the backstop
_HEADER = struct.Struct("<I")
_ERRORS = {"raised": TemplateRaisedError, "limit": TemplateLimitError, "error": ChatTemplateError}


def _send(stream: BinaryIO, obj: Any) -> None:
    data = json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _read_exactly(stream: BinaryIO, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _receive(stream: BinaryIO) -> Any:
    (n,) = _HEADER.unpack(_read_exactly(stream, _HEADER.size))
    return json.loads(_read_exactly(stream, n).decode("utf-8", "surrogatepass"))


# ----------------------------------------------------------------------------------------------------------
# The child


def serve(stdin: BinaryIO, stdout: BinaryIO) -> None:
    while True:
        try:
            job = _receive(stdin)
        except EOFError:
            return
        try:
            answer: dict[str, Any] = {"text": render_chat(**job)}
        except TemplateRaisedError as e:
            answer = {"kind": "raised", "message": str(e)}
        except TemplateLimitError as e:
            answer = {"kind": "limit", "message": str(e)}
        except ChatTemplateError as e:
            answer = {"kind": "error", "message": str(e)}
        except MemoryError:
            answer = {"kind": "limit", "message": "the chat template ran out of the renderer's memory "
                                                  f"({MEMORY_LIMIT_BYTES // 2**30} GiB)"}
        _send(stdout, answer)


def main() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    serve(sys.stdin.buffer, sys.stdout.buffer)


# ----------------------------------------------------------------------------------------------------------
# The parent


class TemplateWorker:
    """The child process, started on first use and again after it was killed or died."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def render(self, template: str, messages: list[dict], *, tools: list[dict] | None = None,
               add_generation_prompt: bool = True, special_tokens: dict | None = None) -> str:
        """render_chat's result, computed in the child: ChatTemplateError (TemplateLimitError past a bound)."""
        job = {"template": template, "messages": messages, "tools": tools,
               "add_generation_prompt": add_generation_prompt, "special_tokens": special_tokens}
        with self._lock:
            proc = self._started()
            assert proc.stdin is not None and proc.stdout is not None
            try:
                _send(proc.stdin, job)
                answer = self._answer(proc)
            except (EOFError, OSError, ValueError):
                self._stop()
                raise TemplateLimitError("the chat template's renderer died (it ran out of memory, or crashed); "
                                         "the template cannot render this request") from None
        if "text" in answer:
            return answer["text"]
        raise _ERRORS[answer["kind"]](answer["message"])

    def _answer(self, proc: subprocess.Popen[bytes]) -> Any:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], KILL_AFTER_S)
        if not ready:
            self._stop()
            raise TemplateLimitError(f"the chat template ran past its time bound of {KILL_AFTER_S:g}s")
        return _receive(proc.stdout)

    def _started(self) -> subprocess.Popen[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
            self._proc = subprocess.Popen([sys.executable, "-m", "qwen_ref.workers_ai.template_worker"],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        return self._proc

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def close(self) -> None:
        with self._lock:
            self._stop()


WORKER = TemplateWorker()
atexit.register(WORKER.close)


def render(template: str, messages: list[dict], **kwargs: Any) -> str:
    """The one render path for requests: render_chat in the bounded child process."""
    return WORKER.render(template, messages, **kwargs)


if __name__ == "__main__":
    main()
