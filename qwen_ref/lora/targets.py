"""Which modules an adapter applies to: PEFT's check_target_module_exists and its all-linear expansion.

target_modules (names, a full-match regex, or "all-linear"), exclude_modules, layers_to_transform with
layers_pattern, and modules_to_save (replaced whole, never adapted), by PEFT's rules (docs/lora.md).
"""

from __future__ import annotations

import re
from collections.abc import Collection

from torch import nn

from qwen_ref.lora.config import ALL_LINEAR, AdapterConfig
from qwen_ref.lora.patterns import matches

OUTPUT_LAYER = "lm_head"  # PEFT's all-linear leaves out the output embedding
EMBEDDING_NAMES = ("embed_tokens", "lm_head")  # the modules weight tying joins
DEFAULT_TARGETS = frozenset({"q_proj", "v_proj"})  # PEFT's default for model_type qwen2 when target_modules is null


def target_modules(cfg: AdapterConfig, model: nn.Module) -> list[str]:
    """The module names the adapter's LoRA applies to, by PEFT's rules."""
    targets = cfg.target_modules
    if targets is None:
        targets = DEFAULT_TARGETS
    elif isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        targets = frozenset(n for n, m in model.named_modules()
                            if isinstance(m, nn.Linear) and n.split(".")[-1] != OUTPUT_LAYER)
    return [name for name, _ in model.named_modules() if name and _is_target(cfg, targets, name)]


def saved_modules(cfg: AdapterConfig, model: nn.Module, present: Collection[str]) -> list[str]:
    """The modules that modules_to_save replaces whole; `present`: the parameter names the adapter file holds.

    PEFT's _set_trainable matched the names by plain suffix up to 0.21 ("norm" also took input_layernorm) and by
    whole name components from 0.22 ("norm" takes model.norm only). A component match is always saved; a module
    that only the plain suffix matches is saved when the file holds its parameters, which tells the two apart.
    Names that match nothing are ignored, as in PEFT."""
    names = []
    for n, module in model.named_modules(remove_duplicate=False):
        if not n or not any(n.endswith(m) for m in cfg.modules_to_save):
            continue
        component = any(n == m or n.endswith("." + m) for m in cfg.modules_to_save)
        if component or any(f"{n}.{p}" in present for p, _ in module.named_parameters()):
            names.append(n)
    return names


def _is_target(cfg: AdapterConfig, targets: frozenset[str] | str, key: str) -> bool:
    if _is_excluded(cfg, key):
        return False
    if isinstance(targets, str):
        return matches(targets, key, full=True) is not None
    if key in targets:
        return True  # a direct hit skips the layer filter, as in PEFT
    if not any(key.endswith("." + t) for t in targets):
        return False
    wanted = cfg.layers_to_transform
    if wanted is None or wanted == ():
        return True
    idx = _layer_index(cfg, key)
    if idx is None:
        return False
    return idx == wanted if isinstance(wanted, int) else idx in wanted


def _is_excluded(cfg: AdapterConfig, key: str) -> bool:
    ex = cfg.exclude_modules
    if isinstance(ex, str):
        if matches(ex, key, full=True):
            return True
    elif ex and (key in ex or any(key.endswith("." + e) for e in ex)):
        return True
    # modules_to_save are replaced whole, never adapted
    return any(matches(rf"(^|.*\.){m}($|\..*)", key) for m in cfg.modules_to_save)


def _layer_index(cfg: AdapterConfig, key: str) -> int | None:
    if not cfg.layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)  # the first numbered segment (our pattern)
    else:
        m = None
        for p in cfg.layers_pattern:
            m = matches(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
            if m:
                break
    return int(m.group("idx")) if m else None
