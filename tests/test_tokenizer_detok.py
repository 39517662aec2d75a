"""The incremental detokenizer (qwen_ref.tokenizer.detok): whole characters only, U+FFFD for invalid UTF-8."""

from __future__ import annotations

import qwen_ref
from qwen_ref.tokenizer.detok import IncrementalDetokenizer, detokenize


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
