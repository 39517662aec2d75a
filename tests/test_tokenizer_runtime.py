"""The runtime tokenizer (qwen_ref.tokenizer.QwenTokenizer): known ids, special tokens, token bytes, bad ids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizer_helpers import (
    QWEN15_SPECIALS,
    QWEN25_NOT_SPECIAL,
    QWEN25_SPECIALS,
    qwen15_dir_fixture,  # noqa: F401 (a fixture)
    qwen15_fixture,  # noqa: F401 (a fixture)
    qwen25_dir_fixture,  # noqa: F401 (a fixture)
    qwen25_fixture,  # noqa: F401 (a fixture)
)

from qwen_ref.errors import TokenizerError

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

