"""Loading tokenizer files (qwen_ref.tokenizer.load_tokenizer) and their bad inputs, and the build cache."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from tokenizer_helpers import qwen15_dir_fixture  # noqa: F401 (a fixture)

import qwen_ref.tokenizer.build as qt
from qwen_ref.errors import TokenizerError
from qwen_ref.tokenizer import build_tokenizer_files, default_tokenizer_dir, load_tokenizer, read_rank_file

# --- loading and bad inputs


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    """A tokenizer built from a five-token rank file on top of the 256 bytes."""
    ranks = [bytes([b]) for b in range(256)] + [b"ab", b"abc", b"aa", b"aaa", b" abc"]
    rank_file = tmp_path / "tiny.tiktoken"
    rank_file.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % i for i, t in enumerate(ranks)))
    return build_tokenizer_files(tmp_path / "tok", "qwen1.5", rank_file=rank_file)


def test_tiny_rank_file(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    assert tok is not None
    assert tok.encode("abc abc") == [257, 260]
    assert tok.encode("aaaa") == [258, 258]
    assert tok.encode("<|im_end|>") == [261 + 2]  # added tokens follow the base vocabulary
    assert tok.vocab_size == 264


def test_missing_tokenizer_is_none(tmp_path):
    assert load_tokenizer(tmp_path / "does-not-exist") is None
    assert load_tokenizer(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert load_tokenizer(tmp_path) is None


@pytest.mark.parametrize("content", [b"", b"{not json", b'{"version": "1.0"}', b"\xff\xfe\x00", b"[]"])
def test_malformed_tokenizer_json(tmp_path, content):
    (tmp_path / "tokenizer.json").write_bytes(content)
    with pytest.raises(TokenizerError, match=r"tokenizer\.json") as err:
        load_tokenizer(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(err.value)


@pytest.mark.parametrize("content", [b"{oops", b"[1, 2]", b"\xff", b'{"chat_template": 3}',
                                     b'{"eos_token": "<|not_a_token|>"}'])
def test_malformed_tokenizer_config(tiny_dir, content):
    (tiny_dir / "tokenizer_config.json").write_bytes(content)
    with pytest.raises(TokenizerError) as err:
        load_tokenizer(tiny_dir)
    assert str(tiny_dir / "tokenizer_config.json") in str(err.value)


def test_config_variants(tiny_dir):
    config = tiny_dir / "tokenizer_config.json"
    config.write_text(json.dumps({"eos_token": {"content": "<|im_end|>"},
                                  "chat_template": [{"name": "tool_use", "template": "T"},
                                                    {"name": "default", "template": "D"}]}))
    tok = load_tokenizer(tiny_dir)
    assert tok is not None and tok.eos_token == "<|im_end|>" and tok.chat_template == "D"
    (tiny_dir / "chat_template.jinja").write_bytes(b"J\r\n")  # wins over the config, read as text
    tok = load_tokenizer(tiny_dir)
    assert tok is not None and tok.chat_template == "J\n"
    config.unlink()
    tok = load_tokenizer(tiny_dir)
    assert tok is not None and tok.eos_token is None and tok.eos_token_id is None


@pytest.mark.parametrize(("content", "match"), [
    (b"IQ== 0\nIg== 2\n", r"tiny.tiktoken:2: rank 2 where 1"),
    (b"IQ== 0\n!!!! 1\n", r"tiny.tiktoken:2: expected"),
    (b"IQ==\n", r"tiny.tiktoken:1: expected"),
    (b"IQ== 0\n", "all 256 single bytes"),
])
def test_bad_rank_file(tmp_path, content, match):
    path = tmp_path / "tiny.tiktoken"
    path.write_bytes(content)
    with pytest.raises(TokenizerError, match=match):
        read_rank_file(path)


def test_unknown_flavor(tmp_path):
    with pytest.raises(TokenizerError, match=r"qwen1\.5, qwen2\.5"):
        build_tokenizer_files(tmp_path, "qwen3")
    with pytest.raises(TokenizerError):
        default_tokenizer_dir("llama")


# --- the cache


def test_cache_reuses_a_finished_build(qwen15_dir, monkeypatch):
    monkeypatch.setenv("QWEN_REF_CACHE", str(qwen15_dir.parents[1]))
    monkeypatch.setattr(qt, "build_tokenizer_files", _fail_if_called)
    assert default_tokenizer_dir("qwen1.5") == qwen15_dir
    assert [p.name for p in qwen15_dir.parent.iterdir()] == [qwen15_dir.name]  # no temporary directories left


def _fail_if_called(*args, **kwargs):
    raise AssertionError("rebuilt a cached tokenizer")


def test_cache_when_another_process_wins_the_race(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_REF_CACHE", str(tmp_path))

    def build_while_another_process_finishes(out_dir, flavor):
        (Path(out_dir) / "tokenizer.json").write_text("ours")
        winner = tmp_path / "tokenizers" / f"{flavor}-v{qt._BUILD_VERSION}"
        winner.mkdir()
        (winner / "tokenizer.json").write_text("theirs")
        return Path(out_dir)

    monkeypatch.setattr(qt, "build_tokenizer_files", build_while_another_process_finishes)
    target = default_tokenizer_dir("qwen2.5")
    assert (target / "tokenizer.json").read_text() == "theirs"
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_cache_failed_build_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_REF_CACHE", str(tmp_path))

    def broken_build(out_dir, flavor):
        (Path(out_dir) / "tokenizer.json").write_text("half")
        raise TokenizerError("boom")

    monkeypatch.setattr(qt, "build_tokenizer_files", broken_build)
    with pytest.raises(TokenizerError, match="boom"):
        default_tokenizer_dir("qwen2.5")
    assert list((tmp_path / "tokenizers").iterdir()) == []
