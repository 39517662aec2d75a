"""qwen-ref score and qwen-ref compare (qwen_ref.oracle.cli), through the command line's main()."""

from __future__ import annotations

import json

import pytest
from conftest import hf_model

from qwen_ref.cli import main as cli_main
from qwen_ref.oracle import make_backend_file_from_transformers

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
GREEDY = {"temperature": 0, "repetition_penalty": 1.1}
SAMPLED = {"temperature": 0.8, "top_k": 8, "top_p": 0.9, "repetition_penalty": 1.3}


@pytest.fixture(scope="module")
def ckpt(tiny):
    return tiny("qwen2.5")


@pytest.fixture(scope="module")
def clean_file(tmp_path_factory, ckpt):
    path = tmp_path_factory.mktemp("oracle_cli") / "clean.jsonl"
    return make_backend_file_from_transformers(path, PROMPTS, checkpoint=ckpt, model=hf_model(ckpt),
                                               params=[GREEDY, SAMPLED], max_new_tokens=8, prompt_logprobs=True)


def test_cli_compare_and_score(ckpt, clean_file, tmp_path, capsys):
    one = tmp_path / "one.jsonl"
    one.write_text(clean_file.read_text().splitlines()[1] + "\n")
    assert cli_main(["compare", str(ckpt), "--backend", str(one), "--output", str(tmp_path / "d.jsonl"),
                     "--plot", str(tmp_path / "p.png")]) == 0
    assert "flagged: 0" in capsys.readouterr().out and (tmp_path / "p.png").is_file()
    # float32 noise exceeds 1e-9: flagged, exit status 1
    assert cli_main(["compare", str(ckpt), "--backend", str(one), "--tolerance", "1e-9"]) == 1
    (tmp_path / "seq.jsonl").write_text(json.dumps({"prompt": "Hello", "completion": ", world"}) + "\n")
    out = tmp_path / "scores.jsonl"
    assert cli_main(["score", str(ckpt), "--input", str(tmp_path / "seq.jsonl"), "--output", str(out),
                     "--top-n", "2"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["token"] for r in rows] == [11, 1879] and len(rows[0]["top"]) == 2
