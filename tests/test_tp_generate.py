"""load(..., tp=N): the engine, sampler and contract on rank 0, the other ranks following each model call.
Greedy generation equals one rank's on every tiny preset; with tp_exact the logits, and so every seeded draw,
n samples, batched decoding and scores, are one rank's bit for bit; bad set-ups are typed errors, not hangs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import qwen_ref
from qwen_ref.checkpoint.tiny import PRESETS
from qwen_ref.engine import Engine, EngineRequest
from qwen_ref.errors import CheckpointError, QwenRefError
from qwen_ref.oracle.score import score
from qwen_ref.parallel.tp import TensorParallelError
from qwen_ref.sampling import RequestState

ROOT = Path(__file__).resolve().parents[1]
GREEDY = {"prompt": "def add(a, b):", "raw": True, "max_tokens": 24, "temperature": 0}  # fits every window
SEEDED = {"messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 12, "seed": 5,
          "temperature": 1.0, "top_p": 0.9, "repetition_penalty": 1.1}


def _tp(path, **options):
    return qwen_ref.load(path, dtype="float32", **options)


# every tiny preset but the two 0.5b-shape ones: those are qwen2.5's and qwen1.5's code at benchmark shapes, and
# take 15 s each here
@pytest.mark.parametrize(("preset", "world"), [(p, 2) for p in PRESETS if not p.endswith("0.5b-shape")] +
                         [("qwen1.5", 4)])
def test_greedy_generation_equals_one_rank(tiny, preset, world):
    one = qwen_ref.load(tiny(preset), dtype="float32", decode_linear="torch")
    with _tp(tiny(preset), tp=world) as two:
        assert qwen_ref.generate(two, GREEDY) == qwen_ref.generate(one, GREEDY)


def test_exact_order_gives_one_ranks_draws_samples_and_scores(tiny):
    path = tiny("qwen2.5-coder-32b-shape")
    one = qwen_ref.load(path, dtype="float32", decode_linear="torch")
    with _tp(path, tp=2, tp_exact=True) as two:
        assert qwen_ref.generate(two, SEEDED) == qwen_ref.generate(one, SEEDED)
        assert qwen_ref.generate(two, SEEDED, n=3) == qwen_ref.generate(one, SEEDED, n=3)  # cloned caches
        logprobs = {**SEEDED, "logprobs": 3}
        assert qwen_ref.generate(two, logprobs) == qwen_ref.generate(one, logprobs)
        ids = one.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 6)  # several chunks
        item = [{"prompt_ids": ids[:5], "token_ids": ids[5:]}]
        assert list(score(two, item)) == list(score(one, item))


def test_batched_decoding_and_prefill_in_pieces(tiny):
    # the engine's fast mode: requests share decode forwards (RowCaches) while a long prompt is prefilled a chunk
    # at a time between them; with tp_exact every forward is one rank's, so the batch's results are one rank's
    path = tiny("qwen2.5")
    one = qwen_ref.load(path, dtype="float32", decode_linear="torch")
    with _tp(path, tp=2, tp_exact=True) as two:
        long = "A much longer prompt that takes several prefill chunks to get through. " * 4
        batch = [{"prompt": text, "max_tokens": 10, "seed": i + 1, "temperature": 0.8}
                 for i, text in enumerate(["Hi", long, "Count: 1 2 3"])]
        options = {"exact": False, "prefill_chunk": 8}
        assert qwen_ref.generate(two, batch, **options) == qwen_ref.generate(one, batch, **options)


def test_torchrun_starts_the_ranks(tiny, tmp_path):
    script = tmp_path / "tp_script.py"
    script.write_text("import sys, json, qwen_ref\n"
                      f"qwen = qwen_ref.load(sys.argv[1], dtype='float32', tp=2)\n"
                      f"print('RESULT', json.dumps(qwen_ref.generate(qwen, {GREEDY!r})))\n")
    path = tiny("qwen1.5")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script),
                          str(path)], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1  # the code after load() runs on rank 0 only
    import json

    one = qwen_ref.load(path, dtype="float32", decode_linear="torch")
    assert json.loads(lines[0][7:]) == qwen_ref.generate(one, GREEDY)


def test_cli_run_with_tp(tiny):
    path = tiny("qwen2.5")
    args = [sys.executable, "-m", "qwen_ref.cli", "run", str(path), "--prompt", "def add(a, b):", "--raw",
            "--max-tokens", "12", "--temperature", "0", "--dtype", "float32"]
    one, two = (subprocess.run(a, capture_output=True, text=True, timeout=240, cwd=ROOT)
                for a in ([*args, "--decode-linear", "torch"], [*args, "--tp", "2"]))
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout == one.stdout


@pytest.mark.parametrize(("options", "error", "needle"), [
    ({"tp": 2, "lora_dir": "adapters"}, CheckpointError, "does not combine with lora"),
    ({"tp": 2, "offload": "disk"}, CheckpointError, "offload"),
    ({"tp": 4}, TensorParallelError, "num_key_value_heads = 2"),
    ({"tp": 0}, TensorParallelError, "0 ranks"),
    ({"tp": "2"}, TensorParallelError, "'2' ranks"),
])
def test_set_ups_that_cannot_work_are_refused_before_any_rank_starts(tiny, options, error, needle):
    started = time.monotonic()
    with pytest.raises(error, match=needle):
        qwen_ref.load(tiny("qwen2.5-coder-32b-shape"), **options)
    assert time.monotonic() - started < 10


def test_a_world_size_that_does_not_match_is_named(tiny, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc-per-node 2 sets it
    with pytest.raises(TensorParallelError, match=r"tp=4, but this process group has 2 ranks"):
        qwen_ref.load(tiny("qwen1.5"), tp=4)


def test_one_tensor_parallel_model_per_process(tiny):
    with _tp(tiny("qwen1.5"), tp=2), pytest.raises(TensorParallelError, match="already runs a tensor-parallel model"):
        _tp(tiny("qwen1.5"), tp=2)
    again = _tp(tiny("qwen1.5"), tp=2)  # after close(), the next one starts
    again.close()


def test_a_rank_that_fails_to_load_is_named(tiny, tmp_path):
    path = tmp_path / "truncated"
    path.mkdir()
    for f in tiny("qwen1.5").iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    weights = path / "model.safetensors"
    with weights.open("r+b") as handle:  # the header stays whole; rank 1's slices are past the end
        handle.truncate(weights.stat().st_size - 1024)
    with pytest.raises(QwenRefError, match=r"rank 1"):
        _tp(path, tp=2)
    _tp(tiny("qwen1.5"), tp=2).close()  # nothing of the failed start is left behind


def test_a_rank_that_dies_is_an_error_not_a_hang(tiny):
    with _tp(tiny("qwen1.5"), tp=2) as two:
        assert qwen_ref.generate(two, GREEDY)
        os.kill(two.ranks.followers[0].pid, signal.SIGKILL)
        two.ranks.followers[0].wait(timeout=30)
        started = time.monotonic()
        with pytest.raises(QwenRefError, match="tensor-parallel group"):
            qwen_ref.generate(two, GREEDY)
        assert time.monotonic() - started < 30
        with pytest.raises(QwenRefError, match="tensor-parallel group is broken"):
            qwen_ref.generate(two, GREEDY)


def _followers_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if b"qwen_ref.parallel.follower" in cmdline and f"QWEN_REF_TP_PARENT={pid}\0".encode() in environ:
            found.append(int(entry.name))
    return found


def test_the_server_with_tp_answers_and_stops_its_ranks(tiny):
    requests = pytest.importorskip("requests")
    from server_helpers import start_server, stop_server

    path = tiny("qwen2.5")
    s = start_server(["--tp", "2", "--name", f"tiny={path}"])
    try:
        assert len(_followers_of(s.proc.pid)) == 1
        answers = [requests.post(s.run_url("tiny"), json=GREEDY, headers=s.auth, timeout=60) for _ in range(2)]
        expected = qwen_ref.generate(qwen_ref.load(path, decode_linear="torch"), GREEDY)
        assert all(a.status_code == 200 and a.json()["result"] == expected for a in answers)
    finally:
        stop_server(s)
    deadline = time.monotonic() + 20
    while _followers_of(s.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _followers_of(s.proc.pid) == []


def test_the_server_refuses_tp_with_two_checkpoints(tiny):
    from qwen_ref.server.app import load_models

    with pytest.raises(QwenRefError, match="--tp serves one checkpoint"):
        load_models([str(tiny("qwen2.5")), str(tiny("qwen1.5"))], load_options={"tp": 2})


def _prompt_logprobs_beside_a_decoding_request(qwen, text: str) -> tuple[list, list]:
    # prefill_ratio makes the scored prompt's chunks run a layer at a time between the other request's decode
    # steps: begin, run_layers, final_hidden and two logits calls, each sent to the followers on its own
    ids, other_ids = qwen.tokenizer.encode(text), qwen.tokenizer.encode("hello")
    engine = Engine(qwen.model, prefill_ratio=0.01)
    other, events = [], []
    engine.add(EngineRequest(other_ids, 30, RequestState.start({"temperature": 0}, other_ids), frozenset()),
               other.append)
    engine.step()
    engine.add(EngineRequest(ids, 3, RequestState.start({"temperature": 0}, ids), frozenset(), prompt_logprobs=2),
               events.append)
    while engine.has_work():
        engine.step()
    return events, other


def test_prompt_logprobs_from_a_prefill_run_a_layer_at_a_time(tiny):
    path = tiny("qwen1.5")
    one = qwen_ref.load(path, dtype="float32", decode_linear="torch")
    with _tp(path, tp=2, tp_exact=True) as two:
        text = "The quick brown fox jumps over the lazy dog. " * 8
        assert _prompt_logprobs_beside_a_decoding_request(two, text) == \
            _prompt_logprobs_beside_a_decoding_request(one, text)


def test_a_failure_of_rank_0_alone_breaks_the_group_instead_of_mixing_collectives(tiny, monkeypatch):
    # rank 0 fails inside a layer, where the followers go on to an all-reduce it never reaches: they time out and
    # stop, and rank 0 refuses every later call rather than pair its next collectives with their stale ones
    monkeypatch.setenv("QWEN_REF_TP_TIMEOUT_S", "5")
    two = _tp(tiny("qwen1.5"), tp=2)
    try:
        assert qwen_ref.generate(two, GREEDY)

        def fail(module, args):
            raise RuntimeError("rank 0 alone")

        two.model.model.layers[0].mlp.register_forward_pre_hook(fail)
        with pytest.raises(QwenRefError, match="tensor-parallel group is broken: RuntimeError: rank 0 alone"):
            qwen_ref.generate(two, GREEDY)
        with pytest.raises(QwenRefError, match="tensor-parallel group is broken"):
            qwen_ref.generate(two, GREEDY)
        assert two.ranks.followers[0].wait(timeout=60) != 0  # its all-reduce timed out: it stopped
    finally:
        started = time.monotonic()
        two.close()
        assert time.monotonic() - started < 30
