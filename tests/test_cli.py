from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import qwen_ref
from qwen_ref.engine import generate_ids
from qwen_ref.tokenizer.detok import detokenize

ROOT = Path(__file__).resolve().parents[1]
QWEN_REF = [sys.executable, "-m", "qwen_ref.cli"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*QWEN_REF, *args], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_run_greedy_on_a_checkpoint_matches_the_engine(tiny):
    path = tiny("qwen2.5")
    r = run_cli("run", str(path), "--prompt", "Hello, world!", "--raw", "--temperature", "0", "--max-tokens", "12")
    assert r.returncode == 0, r.stderr
    q = qwen_ref.load(path)
    ids = generate_ids(q.model, [q.tokenizer.encode("Hello, world!")], 12, stop_ids=q.eos_token_ids)[0]
    out = json.loads(r.stdout)
    assert out["response"] == detokenize(q.tokenizer, ids)
    assert out["usage"] == {"prompt_tokens": 4, "completion_tokens": len(ids), "total_tokens": 4 + len(ids)}
    assert "loading weights" in r.stderr


def test_run_embedded_default_model_streams():
    r = run_cli("run", "tiny", "--prompt", "The capital of France is", "--max-tokens", "4", "--seed", "1")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["usage"]["completion_tokens"] <= 4
    s = run_cli("run", "tiny", "--prompt", "The capital of France is", "--max-tokens", "4", "--seed", "1",
                "--stream")
    assert s.returncode == 0, s.stderr
    assert s.stdout == out["response"] + "\n"
    assert json.loads(s.stderr.strip().splitlines()[-1]) == {"usage": out["usage"]}


def test_run_takes_a_whole_request_body(tiny, tmp_path):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "seed": 4}
    (tmp_path / "req.json").write_text(json.dumps(body))
    a = run_cli("run", str(tiny("qwen2.5")), "--input", str(tmp_path / "req.json"))
    (tmp_path / "msgs.json").write_text(json.dumps(body["messages"]))
    b = run_cli("run", str(tiny("qwen2.5")), "--messages", str(tmp_path / "msgs.json"), "--max-tokens", "3",
                "--seed", "4")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert json.loads(a.stdout) == json.loads(b.stdout)


def test_inspect_prints_every_stage_and_plots(tiny, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "trace.png"
    r = run_cli("inspect", str(tiny("qwen2.5")), "--prompt", "Hello", "--steps", "2", "--top-k", "5",
                "--top-p", "0.9", "--seed", "3", "--repetition-penalty", "1.2", "--plot", str(png))
    assert r.returncode == 0, r.stderr
    for stage in ("raw", "repetition_penalty", "frequency_presence", "temperature", "top_k", "top_p", "final"):
        assert stage in r.stdout
    assert "step 0" in r.stdout and "step 1" in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "/no/such/checkpoint", "--prompt", "x"], "qwen-ref: error: source: '/no/such/checkpoint'"),
        (["run", "Qwen/Qwen2.5-0.5B-Instruct", "--prompt", "x"], "not in the local Hugging Face cache"),
        (["run", "tiny", "--prompt", "x", "--max-tokens", "0"], "Bad input: /max_tokens"),
        (["run", "tiny", "--prompt", "x", "--top-k", "99"], "Bad input: /top_k: 99"),
        (["run", "tiny", "--input", "/no/such/file.json"], "--input: cannot read"),
        (["inspect", "tiny", "--prompt", "x", "--steps", "0"], "--steps must be >= 1"),
    ],
)
def test_cli_errors_are_one_line(args, message):
    r = run_cli(*args)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) <= 2
