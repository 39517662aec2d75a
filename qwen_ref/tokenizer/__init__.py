"""Qwen2's byte-level BPE tokenizer: built offline from the rank file, loaded at run time, detokenized
incrementally."""

from qwen_ref.tokenizer.build import (
    FLAVORS,
    PRETOKENIZE_REGEX,
    build_tokenizer_files,
    chat_template_text,
    default_rank_file,
    default_tokenizer_dir,
    derive_merges,
    read_rank_file,
)
from qwen_ref.tokenizer.detok import IncrementalDetokenizer, detokenize
from qwen_ref.tokenizer.runtime import QwenTokenizer, load_tokenizer

__all__ = [
    "FLAVORS",
    "PRETOKENIZE_REGEX",
    "IncrementalDetokenizer",
    "QwenTokenizer",
    "build_tokenizer_files",
    "chat_template_text",
    "default_rank_file",
    "default_tokenizer_dir",
    "derive_merges",
    "detokenize",
    "load_tokenizer",
    "read_rank_file",
]
