"""What the server tests share: a real server process on loopback (the session fixture `srv`, one process for
every test module that imports it), the tiny models in-process (`qwen15`, `qwen25`) and one torch thread
for them (`_one_thread`). Import the fixtures by their function names, `from server_helpers import srv_fixture`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
requests = pytest.importorskip("requests")

import qwen_ref  # noqa: E402

TOKEN = "test-token-123"
QWEN15 = "@cf/qwen/qwen1.5-0.5b-chat"
MAX_BODY = 256 * 1024
SYSTEM = {"role": "system", "content": "You are a friendly assistant"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, base: str):
        self.proc = proc
        self.base = base
        self.port = 0
        self.auth = {"Authorization": f"Bearer {TOKEN}"}

    def run_url(self, model: str, account: str = "your-account-id") -> str:
        return f"{self.base}/client/v4/accounts/{account}/ai/run/{model}"

    def stats(self, model: str = QWEN15) -> dict[str, int]:
        return requests.get(f"{self.base}/qwen-ref/stats", headers=self.auth, timeout=10).json()["models"][model]

    def wait_idle(self, model: str = QWEN15, timeout: float = 30) -> dict[str, int]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            stats = self.stats(model)
            if stats["active"] == 0 and stats["queued"] == 0:
                return stats
            time.sleep(0.05)
        raise AssertionError(f"the engine is still busy: {stats}")


@pytest.fixture(scope="module", autouse=True, name="_one_thread")
def one_thread_fixture():
    """One torch thread for the in-process runs: on a busy small machine it is the fastest."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module", name="qwen15")
def qwen15_fixture(tiny):
    return qwen_ref.load(tiny("qwen1.5"))


@pytest.fixture(scope="module", name="qwen25")
def qwen25_fixture(tiny):
    return qwen_ref.load(tiny("qwen2.5"))


def _start_server(tiny) -> Server:
    return start_server(["--max-body-bytes", str(MAX_BODY), "--timeout", "60", "--name", f"tiny={tiny('qwen2.5')}",
                         "--name", f"{QWEN15}={tiny('qwen1.5')}"])


def start_server(args: list[str]) -> Server:
    """`python -m qwen_ref.server` with TOKEN, one thread and these flags, on a free port, once it answers."""
    port = _free_port()
    cmd = [sys.executable, "-m", "qwen_ref.server", "--port", str(port), "--api-token", TOKEN, "--threads", "1",
           *args]
    env = {**os.environ, "QWEN_REF_API_TOKEN": ""}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    s = Server(proc, f"http://127.0.0.1:{port}")
    s.port = port
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {proc.stdout.read().decode()}")
        try:
            if requests.get(f"{s.base}/v1/models", headers=s.auth, timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.2)
    return s


def stop_server(s: Server) -> None:
    proc = s.proc
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


# pytest sets a session fixture up once for each test module that imports it, so the server is kept here: one
# process for the session, started by whichever test module asks first and stopped at the end of the session
_SERVERS: list[Server] = []


@pytest.fixture(scope="session", name="srv")
def srv_fixture(tiny):
    if not _SERVERS:
        _SERVERS.append(_start_server(tiny))
    yield _SERVERS[0]
    while _SERVERS:
        stop_server(_SERVERS.pop())
