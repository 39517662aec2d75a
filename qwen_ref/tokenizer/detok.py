"""Incremental detokenization: text out as tokens arrive, never splitting a UTF-8 character.

The text of a generation is defined as the UTF-8 decoding (invalid bytes -> U+FFFD) of the concatenated
bytes of its tokens, special tokens left out. The incremental decoder holds back an incomplete trailing
character until its next bytes arrive, so the concatenated chunks equal the whole decoding exactly.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable

from qwen_ref.tokenizer.runtime import QwenTokenizer


class IncrementalDetokenizer:
    def __init__(self, tokenizer: QwenTokenizer, *, skip_special: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if self.skip_special and token_id in self.tokenizer.special_ids:
            return ""
        return self._decoder.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character becomes U+FFFD)."""
        return self._decoder.decode(b"", final=True)


def detokenize(tokenizer: QwenTokenizer, ids: Iterable[int], *, skip_special: bool = True) -> str:
    d = IncrementalDetokenizer(tokenizer, skip_special=skip_special)
    return "".join(d.push(i) for i in ids) + d.flush()
