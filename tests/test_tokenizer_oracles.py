"""The runtime tokenizer against its oracles: tiktoken on the same ranks, transformers on the built files, and
round trips of any text."""

from __future__ import annotations

import base64
import random
import unicodedata

import pytest
import tiktoken
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tokenizer_helpers import (
    QWEN15_SPECIALS,
    QWEN25_SPECIALS,
    qwen15_dir_fixture,  # noqa: F401 (a fixture)
    qwen15_fixture,  # noqa: F401 (a fixture)
    qwen25_dir_fixture,  # noqa: F401 (a fixture)
    qwen25_fixture,  # noqa: F401 (a fixture)
)

from qwen_ref.tokenizer import PRETOKENIZE_REGEX, default_rank_file


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

