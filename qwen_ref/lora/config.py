"""adapter_config.json: PEFT's LoraConfig fields, each either handled, inert, or refused unless it is off.

An unknown field is refused, because a newer PEFT feature may change the math. Scaling and the per-module
rank/alpha (rank_pattern, alpha_pattern, use_rslora) are computed here, once, for the merge and the per-row path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qwen_ref.errors import QwenRefError

ADAPTER_CONFIG = "adapter_config.json"
ALL_LINEAR = "all-linear"


class LoraError(QwenRefError, ValueError):
    """An adapter cannot be read, does not fit the model, or uses a PEFT feature this merge does not implement."""


# Fields that do not change the merged weights (bookkeeping, training-only settings).
_INERT_FIELDS = frozenset({
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
    "peft_version", "lora_dropout", "eva_config", "corda_config", "lora_ga_config", "loftq_config",
    "megatron_core", "qalora_group_size", "runtime_config", "model_type", "astra_config",
})
# Fields that change the math in ways this package does not implement: each must hold its "off" value.
_OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "use_qalora": (False, None),
    "target_parameters": (None, []),
    "layer_replication": (None, []),
    "alora_invocation_tokens": (None, []),
    "arrow_config": (None, {}),
    "use_bdlora": (None, False, {}),
    "velora_config": (None, {}),
    "monteclora_config": (None, {}),
    "kasa_config": (None, {}),
    "trainable_token_indices": (None, [], {}),
    "megatron_config": (None, {}),
}
_HANDLED_FIELDS = frozenset({
    "r", "lora_alpha", "use_rslora", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
    "rank_pattern", "alpha_pattern", "fan_in_fan_out", "bias", "lora_bias", "modules_to_save", "use_dora",
    "init_lora_weights", "ensure_weight_tying",
})
# init_lora_weights values after which the base weights were changed during training (unless converted, in which
# case PEFT saves init_lora_weights=true): the adapter alone does not reproduce the fine-tune.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "astra")
_BIAS_MODES = ("none", "all", "lora_only")


@dataclass(frozen=True)
class AdapterConfig:
    r: int
    lora_alpha: float
    use_rslora: bool = False
    target_modules: frozenset[str] | str | None = None  # a set of names, a full-match regex, or "all-linear"
    exclude_modules: frozenset[str] | str | None = None
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] = ()
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    bias: str = "none"
    lora_bias: bool = False
    modules_to_save: tuple[str, ...] = ()
    use_dora: bool = False
    ensure_weight_tying: bool = False
    base_model_name_or_path: str | None = None
    auto_mapping: dict[str, Any] | None = None
    model_type: str | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = ADAPTER_CONFIG) -> AdapterConfig:
        unknown = sorted(set(d) - _INERT_FIELDS - _HANDLED_FIELDS - set(_OFF_VALUES))
        if unknown:
            raise LoraError(f"{where}: unknown field(s) {', '.join(unknown)}; they may change the merge, so the "
                            "adapter is refused (known: see docs/lora.md)")
        if d.get("peft_type") != "LORA":
            raise LoraError(f"{where}: peft_type is {d.get('peft_type')!r}; only 'LORA' adapters can be merged")
        if d.get("task_type") not in (None, "CAUSAL_LM"):
            raise LoraError(f"{where}: task_type is {d['task_type']!r}; only CAUSAL_LM adapters fit a causal LM")
        for name, off in _OFF_VALUES.items():
            if d.get(name) not in off:
                raise LoraError(f"{where}: {name}={d[name]!r} is not supported (it changes the merge in a way this "
                                f"implementation does not reproduce); allowed: {off[0]!r}")
        init = d.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
            raise LoraError(f"{where}: init_lora_weights={init!r} changes the base weights during training; "
                            "convert the adapter to plain LoRA first (PEFT save_pretrained with "
                            "path_initial_model_for_weight_conversion)")
        r = _positive_int(d.get("r", 8), f"{where}: r")
        alpha = _number(d.get("lora_alpha", 8), f"{where}: lora_alpha")
        bias = d.get("bias", "none")
        if bias not in _BIAS_MODES:
            raise LoraError(f"{where}: bias={bias!r}; allowed: {', '.join(_BIAS_MODES)}")
        targets = _names_or_regex(d.get("target_modules"), f"{where}: target_modules")
        layers = d.get("layers_to_transform")
        pattern = d.get("layers_pattern")
        if isinstance(targets, str) and (layers is not None or pattern is not None):
            raise LoraError(f"{where}: layers_to_transform/layers_pattern need target_modules to be a list, "
                            f"not the string {targets!r} (PEFT refuses this too)")
        if pattern and layers is None:
            raise LoraError(f"{where}: layers_pattern is set but layers_to_transform is not")
        cfg = cls(
            r=r,
            lora_alpha=alpha,
            use_rslora=_bool(d.get("use_rslora", False), f"{where}: use_rslora"),
            target_modules=targets,
            exclude_modules=_names_or_regex(d.get("exclude_modules"), f"{where}: exclude_modules"),
            layers_to_transform=_layers(layers, f"{where}: layers_to_transform"),
            layers_pattern=_str_tuple(pattern, f"{where}: layers_pattern"),
            rank_pattern=_pattern_dict(d.get("rank_pattern"), f"{where}: rank_pattern", _positive_int),
            alpha_pattern=_pattern_dict(d.get("alpha_pattern"), f"{where}: alpha_pattern", _number),
            fan_in_fan_out=_bool(d.get("fan_in_fan_out", False), f"{where}: fan_in_fan_out"),
            bias=bias,
            lora_bias=_bool(d.get("lora_bias", False), f"{where}: lora_bias"),
            modules_to_save=_str_tuple(d.get("modules_to_save"), f"{where}: modules_to_save"),
            use_dora=_bool(d.get("use_dora", False), f"{where}: use_dora"),
            ensure_weight_tying=_bool(d.get("ensure_weight_tying", False), f"{where}: ensure_weight_tying"),
            base_model_name_or_path=d.get("base_model_name_or_path"),
            auto_mapping=d.get("auto_mapping"),
            model_type=d.get("model_type"),
        )
        if cfg.use_dora and cfg.lora_bias:
            raise LoraError(f"{where}: lora_bias=true with use_dora=true is not a valid PEFT config")
        from qwen_ref.lora.patterns import check_pattern  # patterns.py's errors are LoraErrors: imported here

        for regex in _regexes(cfg):
            check_pattern(regex, where)
        return cfg

    def rank_and_alpha(self, module: str) -> tuple[int, float]:
        return (self.rank_pattern.get(_pattern_key(self.rank_pattern, module), self.r),
                self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module), self.lora_alpha))

    def scaling(self, module: str) -> float:
        r, alpha = self.rank_and_alpha(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _positive_int(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise LoraError(f"{where}: {v!r} is not a positive integer")
    return v


def _number(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise LoraError(f"{where}: {v!r} is not a finite number")
    return v


def _bool(v: Any, where: str) -> bool:
    if not isinstance(v, bool):
        raise LoraError(f"{where}: {v!r} is not true or false")
    return v


def _str_tuple(v: Any, where: str) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,)
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return tuple(v)
    raise LoraError(f"{where}: {v!r} is not a string or a list of strings")


def _names_or_regex(v: Any, where: str) -> frozenset[str] | str | None:
    if v is None or isinstance(v, str):
        return v
    return frozenset(_str_tuple(v, where))


def _layers(v: Any, where: str) -> int | tuple[int, ...] | None:
    if v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
        return v
    if isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        return tuple(v)
    raise LoraError(f"{where}: {v!r} is not a layer index or a list of them")


def _pattern_dict(v: Any, where: str, check) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise LoraError(f"{where}: {v!r} is not an object")
    return {str(k): check(x, f"{where}[{k!r}]") for k, x in v.items()}


def _regexes(cfg: AdapterConfig) -> list[str]:
    out = [p for p in (cfg.target_modules, cfg.exclude_modules) if isinstance(p, str) and p.lower() != ALL_LINEAR]
    out += [rf"(.*\.)?({k})$" for k in [*cfg.rank_pattern, *cfg.alpha_pattern]]
    out += [rf"(^|.*\.){m}($|\..*)" for m in cfg.modules_to_save]
    out += [rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." for p in cfg.layers_pattern]
    return out


def _pattern_key(patterns: Mapping[str, Any], module: str) -> str:
    """PEFT's get_pattern_key: the first pattern whose regex matches the end of the module name, else the name."""
    from qwen_ref.lora.patterns import matches

    for key in patterns:
        if matches(rf"(.*\.)?({key})$", module):
            return key
    return module
