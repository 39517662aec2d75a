"""Named adapters: the subdirectories of one directory, loaded on first use and kept; plain names only."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import Any

from torch import nn

from qwen_ref.lora.adapter import LoraAdapter
from qwen_ref.lora.config import ADAPTER_CONFIG, LoraError
from qwen_ref.lora.merge import active_adapter, merge, unmerge
from qwen_ref.lora.plan import check

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class AdapterNotFoundError(LoraError, LookupError):
    """A registry has no adapter of that name."""


def check_adapter_name(name: Any) -> str:
    if not isinstance(name, str):
        raise LoraError(f"lora: {name!r} is not a string")
    if not _NAME.fullmatch(name) or ".." in name:
        raise LoraError(f"lora: {name!r} is not a plain adapter name: use 1-128 letters, digits, '.', '_' or '-', "
                        "starting with a letter or digit, without '..' (no paths)")
    return name


class AdapterRegistry:
    """Adapters stored as subdirectories of one directory, loaded on first use and kept."""

    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = Path(directory).expanduser().resolve()
        if not self.directory.is_dir():
            raise LoraError(f"lora_dir: {os.fspath(directory)!r} is not a directory")
        self._cache: dict[str, LoraAdapter] = {}
        self._lock = threading.RLock()

    def names(self) -> list[str]:
        return sorted(p.name for p in self.directory.iterdir()
                      if _NAME.fullmatch(p.name) and ".." not in p.name and (p / ADAPTER_CONFIG).is_file())

    def get(self, name: str) -> LoraAdapter:
        check_adapter_name(name)
        with self._lock:
            if name in self._cache:
                return self._cache[name]
            path = self.directory / name
            if not path.is_dir():
                raise AdapterNotFoundError(f"lora: no adapter named {name!r}")  # no server path in API errors
            if path.resolve().parent != self.directory:
                raise LoraError(f"lora: {name!r} links outside the adapter directory")
            adapter = LoraAdapter.from_dir(path, name=name)
            self._cache[name] = adapter
            return adapter

    def activate(self, model: nn.Module, lora: str | LoraAdapter | None) -> LoraAdapter | None:
        """Make `lora` (a name in this directory, or an adapter) the merged one; None: the base model.

        No-op when it already is. A name or adapter that fails validation raises before anything is unmerged.
        Merge-on-switch serves one adapter per batch; qwen_ref.lora.RowAdapters gives each row its own instead.
        """
        with self._lock:
            adapter = lora if isinstance(lora, LoraAdapter) or lora is None else self.get(lora)
            if active_adapter(model) is adapter:
                return adapter
            if adapter is not None:
                check(model, adapter)
            unmerge(model)
            if adapter is not None:
                merge(model, adapter)
            return adapter


def resolve_adapter(lora: str | os.PathLike[str] | LoraAdapter, registry: AdapterRegistry | None = None
                    ) -> LoraAdapter:
    """An adapter from an instance, a name in the registry, or a directory path (a plain name that is not a
    directory goes to the registry, whose error names the problem)."""
    if isinstance(lora, LoraAdapter):
        return lora
    if registry is not None and isinstance(lora, str) and "/" not in lora and os.sep not in lora \
            and ((registry.directory / lora).is_dir() or not Path(lora).is_dir()):
        return registry.get(lora)
    return LoraAdapter.from_dir(lora)
