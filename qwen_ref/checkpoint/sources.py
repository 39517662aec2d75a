"""Where a checkpoint comes from: the embedded tiny models, a directory, a Workers AI id, a hub repo id."""

from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from qwen_ref import known_models
from qwen_ref.checkpoint.tiny import DEFAULT_PRESET, PRESETS, cached_tiny_checkpoint
from qwen_ref.errors import SourceNotFoundError

# What a hub download fetches: configs, weights, tokenizer. Never pickle files.
HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
]
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def resolve_source(source: str | os.PathLike[str]) -> tuple[Path, known_models.KnownModel | None]:
    """A local directory for source: "tiny[:PRESET]", a directory, a Workers AI id or a hub repo id."""
    text = os.fspath(source)
    if text == "tiny" or text.startswith("tiny:"):
        preset = text.partition(":")[2] or DEFAULT_PRESET
        if preset not in PRESETS:
            raise SourceNotFoundError(f"source: {text!r}: unknown tiny preset; allowed: "
                                      + ", ".join(f"tiny:{p}" for p in PRESETS))
        return cached_tiny_checkpoint(preset), None
    path = Path(text).expanduser()
    if path.is_dir():
        return path, None
    if path.exists():
        raise SourceNotFoundError(f"source: {text!r} is a file; pass the checkpoint directory that contains it")
    known = None
    if text.startswith("@cf/"):
        known = known_models.lookup(text)
        if known is None:
            raise SourceNotFoundError(
                f"source: {text!r} is not a known Workers AI model; allowed: {', '.join(known_models.KNOWN_MODELS)}"
            )
        text = known.hf_repo
    if not _REPO_ID.match(text):
        raise SourceNotFoundError(
            f"source: {text!r} is neither a directory, 'tiny', a Workers AI id (@cf/qwen/...) nor a hub repo id "
            "(org/name)"
        )
    return _download(text), known


def _download(repo_id: str) -> Path:
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=offline))
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as e:
        raise SourceNotFoundError(f"source: hub repo {repo_id!r} cannot be fetched ({type(e).__name__}); "
                                  "check the name and your HF token (huggingface-cli login)") from None
    except LocalEntryNotFoundError:
        raise SourceNotFoundError(
            f"source: {repo_id!r} is not in the local Hugging Face cache and the hub cannot be reached"
            f"{' (HF_HUB_OFFLINE is set)' if offline else ''}; download it where there is network "
            f"(huggingface-cli download {repo_id}) or pass a local checkpoint directory"
        ) from None
    except OSError as e:  # connection errors are OSErrors in requests/httpx
        raise SourceNotFoundError(f"source: {repo_id!r}: hub download failed ({e}); pass a local directory or "
                                  "retry with network") from None
    if not (path / "config.json").is_file():
        raise SourceNotFoundError(f"source: {repo_id!r}: the cached snapshot {path} has no config.json "
                                  "(an incomplete earlier download?); download it again with network")
    return path
