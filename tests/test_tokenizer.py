from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import qwen_ref
import qwen_ref.tokenizer.build as qt
from qwen_ref.errors import TokenizerError
from qwen_ref.tokenizer import (
    PRETOKENIZE_REGEX,
    QwenTokenizer,
    build_tokenizer_files,
    default_rank_file,
    default_tokenizer_dir,
    derive_merges,
    load_tokenizer,
    read_rank_file,
)
from qwen_ref.tokenizer.detok import IncrementalDetokenizer, detokenize

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "qwen_ref" / "data" / "chat_templates"
QWEN25_SPECIALS = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647, "<|box_start|>": 151648, "<|box_end|>": 151649, "<|quad_start|>": 151650,
    "<|quad_end|>": 151651, "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655, "<|video_pad|>": 151656, "<tool_call>": 151657, "</tool_call>": 151658,
    "<|fim_prefix|>": 151659, "<|fim_middle|>": 151660, "<|fim_suffix|>": 151661, "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663, "<|file_sep|>": 151664,
}
QWEN25_NOT_SPECIAL = {151657, 151658, 151659, 151660, 151661, 151662, 151663, 151664}
QWEN15_SPECIALS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}


@pytest.fixture(scope="session")
def qwen25_dir(tmp_path_factory) -> Path:
    return build_tokenizer_files(tmp_path_factory.mktemp("qwen2.5"), "qwen2.5")


@pytest.fixture(scope="session")
def qwen15_dir(tmp_path_factory) -> Path:
    with pytest.MonkeyPatch.context() as mp:  # built through the cache, as the embedded model does
        mp.setenv("QWEN_REF_CACHE", str(tmp_path_factory.mktemp("cache")))
        return default_tokenizer_dir("qwen1.5")


@pytest.fixture(scope="session")
def qwen25(qwen25_dir) -> QwenTokenizer:
    tok = load_tokenizer(qwen25_dir)
    assert tok is not None
    return tok


@pytest.fixture(scope="session")
def qwen15(qwen15_dir) -> QwenTokenizer:
    tok = load_tokenizer(qwen15_dir)
    assert tok is not None
    return tok


@pytest.fixture(scope="session")
def tiktoken_oracle() -> tiktoken.Encoding:
    # parsed here independently of read_rank_file
    ranks = {}
    for line in default_rank_file().read_bytes().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding("qwen-oracle", pat_str=PRETOKENIZE_REGEX, mergeable_ranks=ranks,
                             special_tokens=QWEN25_SPECIALS)


CURATED = [
    "Hello, world!", "", " ", "  ", "\n", "\r\n", "\n\n\n", "\t\tindented", "trailing   ", "   leading",
    "I'm here, you're there, they'll see, we've done, she'd go, it's. DON'T CAN'T I'LL WE'RE",
    "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }\r\n", '<div class="x">&amp;</div>',
    "SELECT * FROM t WHERE id = 42;", "https://example.com/a?b=c&d=e#f", "1234567890", "3.14159 -0 +1e-10",
    "2024-01-01T00:00:00Z", "你好，世界！", "我爱自然语言处理。", "こんにちは世界", "안녕하세요",
    "Привет, мир!",
    "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "สวัสดีชาวโลก", "😀😃😄 👍🏽 👨‍👩‍👧‍👦 🇺🇸",
    "café naïve résumé", "e\u0301 a\u0308 o\u0302 n\u0303", "\u212b \u2126 \ufb01 \u2460", "x\u0344y",
    "\u00a0nbsp\u3000ideographic", "mixed中文and English123混合", "a" * 300, " " * 50 + "x", "\n" * 20,
    "!!!???...", "$$$ 100% @user #tag", "\x00\x01\x7f control", "ZWJ\u200dZWNJ\u200c", "\ufeffBOM",
    "<|im_start|", "<|IM_START|>", "<| im_start |>", "<tool_call", "tool_call>",
]
FRAGMENTS = [
    "the", " quick", " brown", "Fox", " JUMPS", "'s", "'ll", "'VE", " ", "  ", "   ", "\t", "\n", "\r\n",
    "\n\n",
    "0", "42", "1234567", "3.14", ",", ".", "!?", "...", "->", "==", "{}", "()", "[]", "</", "/>", "#", "//",
    "def", " return", "self", "_init_", "x_1", "世界", "你好", "，", "。", "日本語", "한국어", "русский",
    "ελληνικά", "العربية", "עברית", "हिन्दी", "ไทย", "😀", "🇯🇵", "👩‍💻", "\u0301", "\u0308", "e\u0301",
    "\u00e9", "\u1e9b\u0323", "\u00a0", "\u3000", "\u2028", "\ufeff", "\u200b", "ﬁ", "①", "½", "Ⅻ", "é",
]


def sample_texts(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = list(CURATED)
    while len(texts) < n:
        texts.append("".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 12))))
    return texts


def texts_with_specials(specials: list[str], n: int = 150, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    out = ["<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n", "<<|endoftext|>>", "<|im_end|>\n\n"]
    while len(out) < n:
        parts = [rng.choice(FRAGMENTS + specials + specials) for _ in range(rng.randint(1, 10))]
        out.append("".join(parts))
    return out


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


# --- known ids and special tokens


@pytest.mark.parametrize("flavor", ["qwen1.5", "qwen2.5"])
def test_hello_world(flavor, qwen15, qwen25):
    tok = qwen15 if flavor == "qwen1.5" else qwen25
    assert tok.encode("Hello, world!") == [9707, 11, 1879, 0]
    assert tok.decode([9707, 11, 1879, 0]) == "Hello, world!"


def test_qwen25_special_tokens(qwen25):
    for text, i in QWEN25_SPECIALS.items():
        assert qwen25.encode(text) == [i]
        assert qwen25.decode([i]) == text
        assert qwen25.token_to_id(text) == i and qwen25.id_to_token(i) == text
        assert qwen25.token_bytes(i) == text.encode()
    assert qwen25.vocab_size == 151665
    assert qwen25.special_ids == set(QWEN25_SPECIALS.values()) - QWEN25_NOT_SPECIAL
    assert (qwen25.eos_token, qwen25.eos_token_id, qwen25.pad_token, qwen25.pad_token_id) == (
        "<|im_end|>", 151645, "<|endoftext|>", 151643)
    ids = qwen25.encode("<|im_start|>user\nhi<|im_end|><tool_call>{}</tool_call><|endoftext|>")
    assert ids == [151644, 872, 198, 6023, 151645, 151657, 6257, 151658, 151643]
    assert qwen25.decode(ids, skip_special_tokens=True) == "user\nhi<tool_call>{}</tool_call>"


def test_qwen15_special_tokens(qwen15):
    for text, i in QWEN15_SPECIALS.items():
        assert qwen15.encode(text) == [i]
        assert qwen15.decode([i]) == text
    assert qwen15.vocab_size == 151646
    assert qwen15.special_ids == set(QWEN15_SPECIALS.values())
    assert len(qwen15.encode("<tool_call>")) > 1  # plain text before Qwen2.5
    assert qwen15.eos_token_id == 151645 and qwen15.pad_token_id == 151643


def test_token_bytes_reassemble_utf8(qwen25):
    text = "naïve 😀 日本語 👨‍👩‍👧 \x00end"
    ids = qwen25.encode(text)
    pieces = [qwen25.token_bytes(i) for i in ids]
    assert b"".join(pieces) == text.encode()
    assert any(_not_utf8(p) for p in pieces)  # some tokens are fragments of a character


def _not_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def test_unknown_and_invalid_ids(qwen25):
    assert qwen25.token_bytes(151935) == b""  # a padding row of the model: unknown to the tokenizer
    assert qwen25.decode([9707, 151935]) == "Hello"
    assert qwen25.id_to_token(151935) is None and qwen25.token_to_id("no such token") is None
    assert qwen25.decode([np.int64(9707), torch.tensor(11)]) == "Hello,"
    for bad in (-1, 1.5, "3", True, None):
        with pytest.raises(TokenizerError, match="non-negative ints"):
            qwen25.decode([bad])
    with pytest.raises(TokenizerError):
        qwen25.token_bytes(-1)
    with pytest.raises(TypeError):
        qwen25.encode(b"bytes")  # type: ignore[arg-type]


# --- oracles


def test_matches_tiktoken(qwen25, tiktoken_oracle):
    texts = sample_texts()
    for text in texts:
        assert qwen25.encode(nfc(text)) == tiktoken_oracle.encode_ordinary(nfc(text)), repr(text)
    for text in map(nfc, texts_with_specials(list(QWEN25_SPECIALS))):
        assert qwen25.encode(text) == tiktoken_oracle.encode(text, allowed_special="all"), repr(text)


@pytest.mark.parametrize("flavor", ["qwen1.5", "qwen2.5"])
def test_matches_transformers(flavor, request):
    from transformers import AutoTokenizer

    directory = request.getfixturevalue(f"{flavor.replace('.', '')}_dir")
    ours = request.getfixturevalue(flavor.replace(".", ""))
    hf = AutoTokenizer.from_pretrained(directory)
    specials = list(QWEN25_SPECIALS if flavor == "qwen2.5" else QWEN15_SPECIALS)
    for text in sample_texts() + texts_with_specials(specials) + texts_with_specials(list(QWEN25_SPECIALS)):
        ids = ours.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids, repr(text)
        for skip in (False, True):
            assert hf.decode(ids, skip_special_tokens=skip) == ours.decode(ids, skip_special_tokens=skip)
    assert (hf.eos_token, hf.pad_token, hf.bos_token) == (ours.eos_token, ours.pad_token, None)
    assert len(hf) == ours.vocab_size


SURFACES = list(QWEN25_SPECIALS)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text())
def test_round_trip(qwen25, text):
    assume(not any(s in nfc(text) for s in SURFACES))
    ids = qwen25.encode(text)
    assert qwen25.decode(ids) == nfc(text)
    assert b"".join(qwen25.token_bytes(i) for i in ids) == nfc(text).encode()


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


def test_incremental_detokenizer_never_splits_a_character(tiny):
    tok = qwen_ref.load(tiny("qwen2.5")).tokenizer
    text = "naïve 日本語 😀🎉 café — 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 <|im_end|> end"
    ids = tok.encode(text)
    d = IncrementalDetokenizer(tok)
    chunks = [d.push(i) for i in ids] + [d.flush()]
    assert "".join(chunks) == text.replace("<|im_end|>", "")
    for c in chunks:
        c.encode("utf-8")  # every chunk is whole characters (no lone surrogates, nothing split)
    # invalid UTF-8 (a lone continuation byte, a truncated 3-byte lead) becomes U+FFFD, the same in pieces
    stray = [next(i for i in range(256) if tok.token_bytes(i) == b) for b in (b"\x80", b"a", b"\xe6", b"b")]
    assert detokenize(tok, stray) == b"\x80a\xe6b".decode("utf-8", errors="replace") == "\ufffda\ufffdb"
