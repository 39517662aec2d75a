"""What the tokenizer tests share: the special tokens of each flavour, and the Qwen1.5 and Qwen2.5 tokenizers built
from the rank file (session fixtures: import them as `from tokenizer_helpers import ..._fixture`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qwen_ref.tokenizer import QwenTokenizer, build_tokenizer_files, default_tokenizer_dir, load_tokenizer

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


# pytest sets a session fixture up once for each test module that imports it, so what they make is kept here: each
# tokenizer is built and loaded once per session, whichever test module asks first
_SESSION: dict[str, Any] = {}


def _once(key: str, make: Callable[[], Any]) -> Any:
    if key not in _SESSION:
        _SESSION[key] = make()
    return _SESSION[key]


@pytest.fixture(scope="session", name="qwen25_dir")
def qwen25_dir_fixture(tmp_path_factory) -> Path:
    return _once("qwen25_dir", lambda: build_tokenizer_files(tmp_path_factory.mktemp("qwen2.5"), "qwen2.5"))


@pytest.fixture(scope="session", name="qwen15_dir")
def qwen15_dir_fixture(tmp_path_factory) -> Path:
    def build() -> Path:
        with pytest.MonkeyPatch.context() as mp:  # built through the cache, as the embedded model does
            mp.setenv("QWEN_REF_CACHE", str(tmp_path_factory.mktemp("cache")))
            return default_tokenizer_dir("qwen1.5")

    return _once("qwen15_dir", build)


@pytest.fixture(scope="session", name="qwen25")
def qwen25_fixture(qwen25_dir) -> QwenTokenizer:
    tok = _once("qwen25", lambda: load_tokenizer(qwen25_dir))
    assert tok is not None
    return tok


@pytest.fixture(scope="session", name="qwen15")
def qwen15_fixture(qwen15_dir) -> QwenTokenizer:
    tok = _once("qwen15", lambda: load_tokenizer(qwen15_dir))
    assert tok is not None
    return tok
