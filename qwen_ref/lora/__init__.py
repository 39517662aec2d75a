"""PEFT LoRA adapters: read, validate, merge and unmerge exactly as PEFT does, apply unmerged per batch row, and a
registry of named adapters (docs/lora.md).

    config.py      adapter_config.json: AdapterConfig, scaling       targets.py     which modules an adapter adapts
    adapter.py     LoraAdapter: the files, read and checked          plan.py        an adapter checked against a model
    merge.py       merge / unmerge / active_adapter                  rows.py        RowAdapters: per-row, unmerged
    registry.py    AdapterRegistry, adapter names                    checkpoint.py  write_merged_checkpoint
"""

from qwen_ref.lora.adapter import ADAPTER_WEIGHTS, KEY_PREFIX, PICKLE_SUFFIXES, LoraAdapter
from qwen_ref.lora.checkpoint import write_merged_checkpoint
from qwen_ref.lora.config import ADAPTER_CONFIG, ALL_LINEAR, AdapterConfig, LoraError
from qwen_ref.lora.merge import active_adapter, merge, unmerge
from qwen_ref.lora.plan import check
from qwen_ref.lora.registry import AdapterNotFoundError, AdapterRegistry, check_adapter_name, resolve_adapter
from qwen_ref.lora.rows import RowAdapters, check_unmerged
from qwen_ref.lora.targets import DEFAULT_TARGETS, EMBEDDING_NAMES, OUTPUT_LAYER, target_modules

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "ALL_LINEAR",
    "DEFAULT_TARGETS",
    "EMBEDDING_NAMES",
    "KEY_PREFIX",
    "OUTPUT_LAYER",
    "PICKLE_SUFFIXES",
    "AdapterConfig",
    "AdapterNotFoundError",
    "AdapterRegistry",
    "LoraAdapter",
    "LoraError",
    "RowAdapters",
    "active_adapter",
    "check",
    "check_adapter_name",
    "check_unmerged",
    "merge",
    "resolve_adapter",
    "target_modules",
    "unmerge",
    "write_merged_checkpoint",
]
