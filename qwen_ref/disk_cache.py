"""The on-disk cache for things built on first use (the tokenizer files, the embedded default model)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from qwen_ref.errors import QwenRefError


def cache_root() -> Path:
    return Path(os.environ.get("QWEN_REF_CACHE") or Path.home() / ".cache" / "qwen_ref")


def build_once(target: Path, build: Callable[[Path], object], marker: str) -> Path:
    """target, built by build(dir) unless target/marker already exists. The build goes to a temporary
    directory that is then renamed into place, so concurrent callers never see a partial directory."""
    if (target / marker).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError as e:
            if not (target / marker).is_file():  # else another process finished first
                raise QwenRefError(f"{target}: cannot install the built files there ({e})") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
