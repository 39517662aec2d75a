"""Backend tokens to our ids, for teacher forcing: by id, by bytes, by text, or, for a run of tokens shown only as
U+FFFD, by the one split of the output text that fits (docs/oracle.md, "How tokens are mapped to our ids")."""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from qwen_ref.oracle.formats.records import Alternative, BackendToken

_LLAMA_BYTE = re.compile(r"^byte: \\x([0-9a-fA-F]{2})$")


@dataclass(frozen=True)
class Mapped:
    """A backend token's id in our vocabulary, and how it was found (or why it was not)."""

    id: int | None
    via: str  # "id", "bytes", "text", "split" (recovered from the output text); or why it is unmapped


def _shown(data: bytes) -> str:
    # how a backend shows a token's bytes as text: invalid UTF-8 becomes U+FFFD (runs collapsed, as backends
    # differ in how many they write per invalid sequence)
    return re.sub("\ufffd+", "\ufffd", data.decode("utf-8", errors="replace"))


def _escaped_bytes(text: str) -> bytes | None:
    """OpenAI writes a token that is not valid UTF-8 as "bytes:\\xe4\\xbd"; old llama.cpp as "byte: \\xe4"."""
    m = _LLAMA_BYTE.match(text)
    if m:
        return bytes([int(m.group(1), 16)])
    if text.startswith("bytes:"):
        try:
            return codecs.escape_decode(text[6:].encode("latin-1"))[0]
        except (ValueError, UnicodeEncodeError):
            return None
    return None


class TokenMap:
    """Backend tokens to our ids: an id when the backend gives one; else its bytes (when they are real bytes:
    vLLM writes the UTF-8 of its U+FFFD text there); else its text, which names exactly one token when it is
    valid UTF-8 (the vocabulary's byte strings are distinct). A token holding part of a UTF-8 character shows
    as U+FFFD: a run of such tokens is recovered from the whole output text when exactly one split of the
    bytes between its neighbours into vocabulary tokens matches what each token shows; else it is unmapped."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size

    @cached_property
    def by_bytes(self) -> dict[bytes, int]:
        table: dict[bytes, int] = {}
        for i in range(self.tokenizer.vocab_size):
            table.setdefault(self.tokenizer.token_bytes(i), i)
        table.pop(b"", None)
        return table

    def one(self, token: BackendToken | Alternative) -> Mapped:
        if token.id is not None:
            if token.id >= self.vocab_size:
                return Mapped(None, f"id {token.id} is outside the model's vocabulary of {self.vocab_size}")
            return Mapped(token.id, "id")
        text = token.text
        if text is not None and text.startswith("token_id:") and text[9:].isdigit():  # vLLM's token ids as text
            return self.one(Alternative(0.0, int(text[9:])))
        if token.bytes is not None and b"\xef\xbf\xbd" not in token.bytes:
            found = self.by_bytes.get(token.bytes)
            return Mapped(found, "bytes") if found is not None else Mapped(None, f"no token has bytes {token.bytes!r}")
        if token.bytes is not None and token.bytes in self.by_bytes and text is None:
            return Mapped(self.by_bytes[token.bytes], "bytes")
        if text is None:
            return Mapped(None, "the backend gives neither id, bytes nor text")
        escaped = _escaped_bytes(text)
        if escaped is not None and escaped in self.by_bytes:
            return Mapped(self.by_bytes[escaped], "bytes")
        if "\ufffd" in text or text == "":
            return Mapped(None, f"fragment: {text!r} is part of a UTF-8 character")
        found = self.by_bytes.get(text.encode("utf-8"))
        return Mapped(found, "text") if found is not None else Mapped(None, f"no token is the text {text!r}")

    def resolve(self, tokens: Sequence[BackendToken], output_text: str | None) -> list[Mapped]:
        mapped = [self.one(t) for t in tokens]
        if output_text is not None and any(m.id is None and m.via.startswith("fragment") for m in mapped):
            self._recover_fragments(tokens, mapped, output_text.encode("utf-8"))
        return mapped

    def _recover_fragments(self, tokens: Sequence[BackendToken], mapped: list[Mapped], full: bytes) -> None:
        offset, i = 0, 0
        special = self.tokenizer.special_ids
        while i < len(mapped):
            if mapped[i].id is not None:
                if mapped[i].id not in special:  # special tokens are not in the output text
                    data = self.tokenizer.token_bytes(mapped[i].id)
                    if not full.startswith(data, offset):
                        return  # the text does not line up with the tokens (a stop string trimmed?)
                    offset += len(data)
                i += 1
                continue
            j = i
            while j < len(mapped) and mapped[j].id is None and mapped[j].via.startswith("fragment"):
                j += 1
            if j == i:
                return
            anchor = self.tokenizer.token_bytes(mapped[j].id) if j < len(mapped) and mapped[j].id is not None else None
            shown = [_shown((t.text or "").encode("utf-8")) for t in tokens[i:j]]
            fits = self._fits(full, offset, shown, anchor, j == len(mapped))
            if len(fits) != 1:
                why = "no split" if not fits else "more than one split"
                mapped[i] = Mapped(None, f"fragment run of {j - i} token(s): {why} of the output text matches")
                return
            ids, length = fits[0]
            mapped[i:j] = [Mapped(t, "split") for t in ids]
            offset += length
            i = j

    def _fits(self, full: bytes, offset: int, shown: list[str], anchor: bytes | None,
              at_end: bool) -> list[tuple[list[int], int]]:
        fits: list[tuple[list[int], int]] = []
        for length in range(len(shown), min(16 * len(shown), len(full) - offset) + 1):
            if anchor is not None and not full.startswith(anchor, offset + length):
                continue
            if anchor is None and at_end and offset + length != len(full):
                continue
            for ids in self._splits(full[offset:offset + length], shown):
                fits.append((ids, length))
                if len(fits) > 1:
                    return fits
        return fits

    def _splits(self, data: bytes, shown: list[str]) -> Iterator[list[int]]:
        if not shown:
            if not data:
                yield []
            return
        for cut in range(1, min(16, len(data)) + 1):
            piece = data[:cut]
            token = self.by_bytes.get(piece)
            if token is not None and (shown[0] in ("", _shown(piece))):
                for rest in self._splits(data[cut:], shown[1:]):
                    yield [token, *rest]

