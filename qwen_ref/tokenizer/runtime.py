"""The runtime tokenizer: a checkpoint's tokenizer.json and tokenizer_config.json, loaded with `tokenizers`."""

from __future__ import annotations

import functools
import operator
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from qwen_ref.errors import TokenizerError
from qwen_ref.json_files import read_json_file
from qwen_ref.tokenizer.build import UNICODE_TO_BYTE

LONG_TEXT = 4096  # characters from which encode() releases the GIL


class QwenTokenizer:
    def __init__(self, tokenizer: Tokenizer, config: dict[str, Any], chat_template: str | None) -> None:
        self._tok = tokenizer
        self.config = config
        self.chat_template = chat_template
        added = tokenizer.get_added_tokens_decoder()
        self._added = {i: t.content for i, t in added.items()}
        # the ids skip_special_tokens drops: Qwen2.5's <tool_call>, FIM and repo tokens are not among them
        self.special_ids = frozenset(i for i, t in added.items() if t.special)
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_token = _token_name(config.get("eos_token"))
        self.pad_token = _token_name(config.get("pad_token"))

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self.token_to_id(self.pad_token)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        if len(text) < LONG_TEXT:
            return self._tok.encode(text, add_special_tokens=False).ids
        # encode_batch releases the GIL (encode holds it): a long text does not stall the server's other threads
        return self._tok.encode_batch([text], add_special_tokens=False)[0].ids

    @functools.cached_property
    def longest_token(self) -> int:
        """The most bytes any one token stands for: a text of N bytes has at least N / this many tokens."""
        base = max(map(len, self._tok.get_vocab(with_added_tokens=False)), default=0)  # byte-level: a char a byte
        return max(base, *(len(c.encode("utf-8")) for c in self._added.values()), 1)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Ids the tokenizer does not know (e.g. a model's padding rows past vocab_size) decode to nothing."""
        return self._tok.decode(self._check_ids(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (possibly a fragment of a UTF-8 character); b"" for unknown ids."""
        self._check_ids([token_id])
        if token_id in self._added:
            return self._added[token_id].encode("utf-8")
        token = self._tok.id_to_token(token_id)
        if token is None:
            return b""
        try:
            return bytes(UNICODE_TO_BYTE[c] for c in token)
        except KeyError:
            raise TokenizerError(f"token {token_id} ({token!r}) is not a byte-level BPE token") from None

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    @staticmethod
    def _check_ids(ids: Iterable[int]) -> list[int]:
        checked = []
        for i in ids:
            try:
                index = -1 if isinstance(i, bool) else operator.index(i)  # numpy and 0-d torch ints pass
            except TypeError:
                index = -1
            if index < 0:
                raise TokenizerError(f"token ids must be non-negative ints, got {i!r}")
            checked.append(index)
        return checked


def _token_name(value: Any) -> str | None:
    # tokenizer_config.json stores a token as a string, or as a serialized AddedToken {"content": ...}.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_tokenizer(path: str | os.PathLike[str]) -> QwenTokenizer | None:
    """The tokenizer in a checkpoint directory, or None when it has no tokenizer.json."""
    directory = Path(path)
    tokenizer_file = directory / "tokenizer.json"
    if not tokenizer_file.is_file():
        return None
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as e:  # tokenizers raises a bare Exception for unreadable, non-JSON or invalid files
        raise TokenizerError(f"{tokenizer_file}: not a valid tokenizer.json ({e})") from e

    config_file = directory / "tokenizer_config.json"
    config: Any = {}
    if config_file.is_file():
        config = read_json_file(config_file, TokenizerError)

    qt = QwenTokenizer(tokenizer, config, _chat_template(config, directory, config_file))
    for field in ("eos_token", "pad_token"):
        name = getattr(qt, field)
        if name is not None and qt.token_to_id(name) is None:
            raise TokenizerError(f"{config_file}: {field} {name!r} is not in {tokenizer_file}")
    return qt


def _chat_template(config: dict[str, Any], directory: Path, config_file: Path) -> str | None:
    # As in transformers: a chat_template.jinja file wins over the config's entry, and is read as text.
    template_file = directory / "chat_template.jinja"
    if template_file.is_file():
        try:
            return template_file.read_text(encoding="utf-8")
        except (OSError, ValueError) as e:
            raise TokenizerError(f"{template_file}: cannot read it as UTF-8 text ({e})") from e
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]: the one named "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{config_file}: chat_template must be a string, got {type(template).__name__}")
    return template
