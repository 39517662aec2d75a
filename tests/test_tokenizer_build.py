"""Building the tokenizer files from the rank file (qwen_ref.tokenizer.build): merges, tokenizer.json, the CLI,
and the chat templates they carry."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tokenizer_helpers import (
    qwen15_dir_fixture,  # noqa: F401 (a fixture)
    qwen15_fixture,  # noqa: F401 (a fixture)
    qwen25_dir_fixture,  # noqa: F401 (a fixture)
    qwen25_fixture,  # noqa: F401 (a fixture)
)

from qwen_ref.errors import TokenizerError
from qwen_ref.tokenizer import PRETOKENIZE_REGEX, derive_merges

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "qwen_ref" / "data" / "chat_templates"


# --- the build


def test_derive_merges_small():
    base = [bytes([b]) for b in range(256)]
    assert derive_merges([*base, b"ab", b"abc"]) == [(b"a", b"b"), (b"ab", b"c")]
    assert derive_merges([*base, b"bc", b"ab", b"abc"]) == [(b"b", b"c"), (b"a", b"b"), (b"a", b"bc")]
    assert derive_merges([*base, b"aa", b"aaa"]) == [(b"a", b"a"), (b"aa", b"a")]  # leftmost pair on ties
    with pytest.raises(TokenizerError, match="cannot be built"):
        derive_merges([*base, b"abc"])


def test_merges_match_known_qwen2_prefix(qwen25_dir):
    # the first merges of Qwen2's merges.txt
    lines = (qwen25_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[:5] == ["#version: 0.2", "Ġ Ġ", "ĠĠ ĠĠ", "i n", "Ġ t"]
    assert len(lines) == 1 + 151643 - 256


def test_tokenizer_json_pipeline(qwen25_dir):
    doc = json.loads((qwen25_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert doc["normalizer"] == {"type": "NFC"}
    split, byte_level = doc["pre_tokenizer"]["pretokenizers"]
    assert split["pattern"] == {"Regex": PRETOKENIZE_REGEX} and split["behavior"] == "Isolated"
    assert byte_level == {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                          "use_regex": False}
    model = doc["model"]
    assert model["type"] == "BPE" and model["unk_token"] is None and model["dropout"] is None
    assert model["byte_fallback"] is False
    assert len(model["vocab"]) == 151643 and model["vocab"]["Hello"] == 9707
    config = json.loads((qwen25_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "Qwen2Tokenizer" and config["model_max_length"] == 131072
    assert config["added_tokens_decoder"]["151657"]["special"] is False
    vocab = json.loads((qwen25_dir / "vocab.json").read_text(encoding="utf-8"))
    assert vocab == model["vocab"]


@pytest.mark.slow
def test_cli_build_is_deterministic(qwen25_dir, tmp_path):
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    start = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "scripts" / "build_tokenizer.py"), "--flavor", "qwen2.5",
                    "--out", str(tmp_path)], check=True, env=env, capture_output=True)
    print(f"CLI build: {time.perf_counter() - start:.2f} s")
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (qwen25_dir / name).read_bytes(), name


def test_flavours_share_the_base_vocabulary(qwen15_dir, qwen25_dir):
    for name in ("vocab.json", "merges.txt"):
        assert (qwen15_dir / name).read_bytes() == (qwen25_dir / name).read_bytes()


# --- chat templates


def test_chat_templates_exact(qwen15, qwen25):
    t15 = (TEMPLATES / "qwen1.5.jinja").read_bytes().decode()
    assert t15 == (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    # Qwen/Qwen2.5-0.5B-Instruct tokenizer_config.json chat_template (revision 7ae557604adf), ending in "\n"
    t25 = (TEMPLATES / "qwen2.5.jinja").read_bytes()
    sha256 = hashlib.sha256(t25).hexdigest()
    assert sha256 == "cd8e9439f0570856fd70470bf8889ebd8b5d1107207f67a5efb46e342330527f"
    assert qwen15.chat_template == t15 and qwen25.chat_template == t25.decode()


@pytest.mark.parametrize("flavor", ["qwen1.5", "qwen2.5"])
def test_transformers_renders_the_template(flavor, request):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(request.getfixturevalue(f"{flavor.replace('.', '')}_dir"))
    system = "You are a helpful assistant" if flavor == "qwen1.5" else (
        "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")
    messages = [{"role": "user", "content": "hi"}]
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (f"<|im_start|>system\n{system}<|im_end|>\n"
                    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")

