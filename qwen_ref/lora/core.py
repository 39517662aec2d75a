"""PEFT LoRA adapters: read them, merge them into the weights exactly as PEFT's merge_and_unload does, unmerge.

An adapter directory holds adapter_config.json and adapter_model.safetensors (pickle files are refused). Matching
rules, scaling and the merge formulas follow PEFT (see docs/lora.md). Everything is validated against the model
before any weight is touched, so a failing merge leaves the model as it was. merge() keeps the original tensor of
every parameter it changes, and unmerge() puts those very tensors back: the base is restored bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qwen_ref.checkpoint.weights import read_safetensors_header, read_tensor
from qwen_ref.errors import CheckpointError, QwenRefError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
KEY_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the HF model, whose module names follow
ALL_LINEAR = "all-linear"
OUTPUT_LAYER = "lm_head"  # PEFT's all-linear leaves out the output embedding
EMBEDDING_NAMES = ("embed_tokens", "lm_head")  # the modules weight tying joins
DEFAULT_TARGETS = frozenset({"q_proj", "v_proj"})  # PEFT's default for model_type qwen2 when target_modules is null
_STATE_ATTR = "_qwen_ref_lora"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class LoraError(QwenRefError, ValueError):
    """An adapter cannot be read, does not fit the model, or uses a PEFT feature this merge does not implement."""


class AdapterNotFoundError(LoraError, LookupError):
    """A registry has no adapter of that name."""


# --------------------------------------------------------------------------------------------------------------
# adapter_config.json

# Fields that do not change the merged weights (bookkeeping, training-only settings).
_INERT_FIELDS = frozenset({
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
    "peft_version", "lora_dropout", "eva_config", "corda_config", "lora_ga_config", "loftq_config",
    "megatron_core", "qalora_group_size", "runtime_config", "model_type",
})
# Fields that change the math in ways this module does not implement: each must hold its "off" value.
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
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
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
        for regex in _regexes(cfg):
            try:
                re.compile(regex)
            except re.error as e:
                raise LoraError(f"{where}: {regex!r} is not a valid regular expression ({e})") from None
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
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


# --------------------------------------------------------------------------------------------------------------
# module matching (PEFT's check_target_module_exists and its all-linear expansion)

def _is_excluded(cfg: AdapterConfig, key: str) -> bool:
    ex = cfg.exclude_modules
    if isinstance(ex, str):
        if re.fullmatch(ex, key):
            return True
    elif ex and (key in ex or any(key.endswith("." + e) for e in ex)):
        return True
    # modules_to_save are replaced whole, never adapted
    return any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in cfg.modules_to_save)


def _layer_index(cfg: AdapterConfig, key: str) -> int | None:
    if not cfg.layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)  # the first numbered segment
    else:
        m = None
        for p in cfg.layers_pattern:
            m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
            if m:
                break
    return int(m.group("idx")) if m else None


def _is_target(cfg: AdapterConfig, targets: frozenset[str] | str, key: str) -> bool:
    if _is_excluded(cfg, key):
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
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


def target_modules(cfg: AdapterConfig, model: nn.Module) -> list[str]:
    """The module names the adapter's LoRA applies to, by PEFT's rules."""
    targets = cfg.target_modules
    if targets is None:
        targets = DEFAULT_TARGETS
    elif isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        targets = frozenset(n for n, m in model.named_modules()
                            if isinstance(m, nn.Linear) and n.split(".")[-1] != OUTPUT_LAYER)
    return [name for name, _ in model.named_modules() if name and _is_target(cfg, targets, name)]


def _modules_to_save(cfg: AdapterConfig, model: nn.Module) -> list[str]:
    # PEFT's _set_trainable: a plain suffix match; names that match nothing are ignored
    return [n for n, _ in model.named_modules(remove_duplicate=False)
            if n and any(n.endswith(m) for m in cfg.modules_to_save)]


# --------------------------------------------------------------------------------------------------------------
# adapter files

_LORA_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_B.bias": "B_bias",
    ".lora_embedding_A": "emb_A",
    ".lora_embedding_B": "emb_B",
    ".lora_magnitude_vector.weight": "magnitude",
    ".lora_magnitude_vector": "magnitude",
}


@dataclass
class LoraAdapter:
    name: str
    path: Path
    config: AdapterConfig
    lora: dict[str, dict[str, torch.Tensor]]  # module name -> {"A", "B", "B_bias", "emb_A", "emb_B", "magnitude"}
    replacements: dict[str, torch.Tensor]  # parameter name -> tensor that replaces it (biases, modules_to_save, ...)

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str], name: str | None = None) -> LoraAdapter:
        directory = Path(path)
        if not directory.is_dir():
            raise LoraError(f"adapter {os.fspath(path)!r}: not a directory")
        cfg_path, weights = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
        if not cfg_path.is_file():
            raise LoraError(f"adapter {directory}: no {ADAPTER_CONFIG}")
        if not weights.is_file():
            pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise LoraError(f"adapter {directory}: only pickle weights ({', '.join(pickles)}); pickle files are "
                                f"never loaded. Save the adapter as {ADAPTER_WEIGHTS} (PEFT save_pretrained with "
                                "safe_serialization=True)")
            raise LoraError(f"adapter {directory}: no {ADAPTER_WEIGHTS}")
        try:
            raw = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LoraError(f"{cfg_path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise LoraError(f"{cfg_path}: not a JSON object")
        config = AdapterConfig.from_dict(raw, str(cfg_path))
        lora, replacements = _split_keys(_read_all(weights), weights)
        return cls(name or directory.name, directory, config, lora, replacements)

    def __repr__(self) -> str:
        return f"LoraAdapter(name={self.name!r}, path={str(self.path)!r}, modules={len(self.lora)})"


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    try:
        entries = read_safetensors_header(path)
        with path.open("rb") as handle:
            tensors = {name: read_tensor(entry, handle) for name, entry in entries.items()}
    except CheckpointError as e:
        raise LoraError(f"adapter weights: {e}") from None
    for name, t in tensors.items():
        # amax propagates NaN and inf; on CPU it is much faster than isfinite(t).all() for bf16
        if t.numel() and not bool(torch.isfinite(t.float().abs().amax())):
            raise LoraError(f"{path}: tensor {name!r} holds NaN or infinite values")
    return tensors


def _split_keys(tensors: dict[str, torch.Tensor], path: Path):
    lora: dict[str, dict[str, torch.Tensor]] = {}
    replacements: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if not key.startswith(KEY_PREFIX):
            raise LoraError(f"{path}: tensor {key!r} does not start with {KEY_PREFIX!r}; not a PEFT causal-LM adapter")
        key = key[len(KEY_PREFIX):]
        suffix = next((s for s in _LORA_SUFFIXES if key.endswith(s)), None)
        if suffix is not None:
            lora.setdefault(key[: -len(suffix)], {})[_LORA_SUFFIXES[suffix]] = t
        elif ".lora_" in key or key.startswith("lora_"):
            raise LoraError(f"{path}: tensor {key!r} is not a LoRA tensor this merge knows (only lora_A/lora_B, "
                            "lora_embedding_A/B and lora_magnitude_vector; was it saved with an adapter name?)")
        else:
            # a base-model parameter saved whole: bias="all"/"lora_only", modules_to_save, saved embeddings
            replacements[key.replace(".base_layer.", ".")] = t
    return lora, replacements


# --------------------------------------------------------------------------------------------------------------
# validation against a model -> a merge plan

@dataclass
class _Delta:
    module: str
    kind: str  # "linear" or "embedding"
    scaling: float
    A: torch.Tensor
    B: torch.Tensor
    magnitude: torch.Tensor | None


@dataclass
class _Plan:
    deltas: dict[int, list[_Delta]] = field(default_factory=dict)  # id(weight Parameter) -> deltas, in order
    bias_deltas: dict[int, tuple[torch.Tensor, float]] = field(default_factory=dict)  # id(bias Parameter) -> (b, s)
    inplace: dict[int, torch.Tensor] = field(default_factory=dict)  # id(Parameter) -> replacement value
    slots: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)  # (module, param) -> untied value
    params: dict[int, nn.Parameter] = field(default_factory=dict)


def check(model: nn.Module, adapter: LoraAdapter) -> None:
    """Raise LoraError if the adapter does not fit the model; touches nothing."""
    _plan(model, adapter)


def _plan(model: nn.Module, adapter: LoraAdapter) -> _Plan:
    cfg, where = adapter.config, f"adapter {adapter.name!r}"
    _check_architecture(model, adapter)
    modules = dict(model.named_modules(remove_duplicate=False))
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = _tied_names(model)
    if cfg.ensure_weight_tying and tied and (
        any(m.split(".")[-1] in EMBEDDING_NAMES for m in cfg.modules_to_save)
        or any(n.split(".")[-1] in EMBEDDING_NAMES for n in target_modules(cfg, model))
    ):
        raise LoraError(f"{where}: ensure_weight_tying=true on tied embeddings is not supported")

    targets = target_modules(cfg, model)
    if not targets and (cfg.target_modules or adapter.lora):
        raise LoraError(f"{where}: target_modules {_show(cfg.target_modules)} match no module of the model")
    plan = _Plan()
    for name in targets:
        delta = _delta_for(where, cfg, name, modules[name], adapter.lora.get(name))
        weight = modules[name].weight
        plan.params[id(weight)] = weight
        plan.deltas.setdefault(id(weight), []).append(delta)
        b = adapter.lora[name].get("B_bias")
        if b is not None:
            bias = getattr(modules[name], "bias", None)
            if bias is None:
                raise LoraError(f"{where}: {name}: lora_bias is set but the layer has no bias, so the adapter "
                                "cannot be merged (PEFT refuses this merge too)")
            _expect_shape(where, f"{name}.lora_B.bias", b, tuple(bias.shape))
            plan.params[id(bias)] = bias
            plan.bias_deltas[id(bias)] = (b, delta.scaling)
    stray = sorted(set(adapter.lora) - set(targets))
    if stray:
        raise LoraError(f"{where}: LoRA tensors for {_some(stray)}, which the config does not target "
                        f"(target_modules {_show(cfg.target_modules)}) or the model does not have")
    for ds in plan.deltas.values():
        if len(ds) > 1 and any(d.magnitude is not None for d in ds):
            raise LoraError(f"{where}: DoRA on tied weights ({', '.join(d.module for d in ds)}) is not supported")

    saved = set(_modules_to_save(cfg, model))
    for mod in sorted(saved):
        missing = [f"{mod}.{p}" for p, _ in modules[mod].named_parameters()
                   if f"{mod}.{p}" not in adapter.replacements]
        if missing:
            raise LoraError(f"{where}: modules_to_save names {mod} but the adapter lacks {_some(missing)}")
    for pname, value in adapter.replacements.items():
        if pname not in params:
            raise LoraError(f"{where}: tensor {pname!r} names no parameter of the model")
        _expect_shape(where, pname, value, tuple(params[pname].shape))
        mod, _, leaf = pname.rpartition(".")
        p = params[pname]
        if mod in saved and pname in tied:
            plan.slots[(mod, leaf)] = value  # PEFT's modules_to_save copy: only this module changes
        else:
            earlier = plan.inplace.get(id(p))
            if earlier is not None and not torch.equal(earlier, value):
                raise LoraError(f"{where}: tied parameters {', '.join(sorted(tied))} get different replacements")
            plan.inplace[id(p)] = value
            plan.params[id(p)] = p
    return plan


def _delta_for(where: str, cfg: AdapterConfig, name: str, module: nn.Module,
               tensors: dict[str, torch.Tensor] | None) -> _Delta:
    r, _ = cfg.rank_and_alpha(name)
    if isinstance(module, nn.Linear):
        kind, a_key, b_key = "linear", "A", "B"
        a_shape, b_shape = (r, module.in_features), (module.out_features, r)
        m_shape = (module.out_features,)
    elif isinstance(module, nn.Embedding):
        kind, a_key, b_key = "embedding", "emb_A", "emb_B"
        a_shape, b_shape = (r, module.num_embeddings), (module.embedding_dim, r)
        m_shape = (module.embedding_dim,)
    else:
        raise LoraError(f"{where}: target {name} is a {type(module).__name__}; LoRA applies to Linear and "
                        "Embedding layers only")
    tensors = tensors or {}
    wrong = sorted(set(tensors) - {a_key, b_key, "B_bias", "magnitude"})
    if wrong:
        raise LoraError(f"{where}: {name} is a {type(module).__name__} but the adapter has {wrong} tensors for it")
    missing = [k for k in (a_key, b_key) if k not in tensors]
    if cfg.use_dora and "magnitude" not in tensors:
        missing.append("magnitude")
    if missing:
        raise LoraError(f"{where}: {name} is targeted but the adapter lacks its {', '.join(missing)} tensor(s)")
    if "magnitude" in tensors and not cfg.use_dora:
        raise LoraError(f"{where}: {name} has a lora_magnitude_vector but use_dora is false")
    if "B_bias" in tensors and not cfg.lora_bias:
        raise LoraError(f"{where}: {name} has a lora_B.bias but lora_bias is false")
    if cfg.lora_bias and kind == "linear" and "B_bias" not in tensors:
        raise LoraError(f"{where}: lora_bias is true but {name} has no lora_B.bias")
    if cfg.lora_bias and kind == "embedding":
        raise LoraError(f"{where}: lora_bias is not supported for the embedding {name} (nor by PEFT)")
    _expect_shape(where, f"{name} lora A (rank {r})", tensors[a_key], a_shape)
    _expect_shape(where, f"{name} lora B (rank {r})", tensors[b_key], b_shape)
    magnitude = tensors.get("magnitude")
    if magnitude is not None:
        _expect_shape(where, f"{name}.lora_magnitude_vector", magnitude, m_shape)
    return _Delta(name, kind, cfg.scaling(name), tensors[a_key], tensors[b_key], magnitude)


def _expect_shape(where: str, what: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise LoraError(f"{where}: {what} has shape {tuple(t.shape)}, the model needs {shape} "
                        "(an adapter for another model?)")


_ARCH_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size")


def _check_architecture(model: nn.Module, adapter: LoraAdapter) -> None:
    cfg, where = adapter.config, f"adapter {adapter.name!r}"
    if cfg.model_type is not None and "qwen" not in str(cfg.model_type).lower():
        raise LoraError(f"{where}: model_type {cfg.model_type!r} is not a Qwen model")
    base_class = (cfg.auto_mapping or {}).get("base_model_class")
    if base_class is not None and base_class != "Qwen2ForCausalLM":
        raise LoraError(f"{where}: made for {base_class}, not Qwen2ForCausalLM")
    base = cfg.base_model_name_or_path
    model_cfg = getattr(model, "config", None)
    if not base or model_cfg is None:
        return
    try:
        base_config = json.loads((Path(base).expanduser() / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # a hub id or a path not on this machine: the tensor shapes decide
    if base_config.get("model_type") not in (None, "qwen2"):
        raise LoraError(f"{where}: its base model {base} is a {base_config.get('model_type')!r} model, not qwen2")
    diff = [f"{k} {base_config[k]} there, {getattr(model_cfg, k)} here" for k in _ARCH_FIELDS
            if k in base_config and hasattr(model_cfg, k) and base_config[k] != getattr(model_cfg, k)]
    if diff:
        raise LoraError(f"{where}: made for {base}, whose architecture differs: {'; '.join(diff)}")


def _tied_names(model: nn.Module) -> set[str]:
    """Names of parameters that share their Parameter object with another name."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {n for names in by_id.values() if len(names) > 1 for n in names}


def _show(targets: Any) -> str:
    return repr(sorted(targets)) if isinstance(targets, frozenset) else repr(targets)


def _some(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")


# --------------------------------------------------------------------------------------------------------------
# merge / unmerge

@dataclass
class _MergeState:
    adapter: LoraAdapter
    originals: dict[int, tuple[nn.Parameter, torch.Tensor]]  # id -> (Parameter, its original tensor)
    slots: dict[tuple[str, str], nn.Parameter]  # (module, param) -> the Parameter it held before


def active_adapter(model: nn.Module) -> LoraAdapter | None:
    state = getattr(model, _STATE_ATTR, None)
    return state.adapter if state is not None else None


@torch.no_grad()
def merge(model: nn.Module, adapter: LoraAdapter) -> None:
    """Merge the adapter into the model's weights. Refuses (LoraError) while another merge is active."""
    current = active_adapter(model)
    if current is not None:
        raise LoraError(f"adapter {current.name!r} is already merged; unmerge() it first (or switch with "
                        "AdapterRegistry.activate)")
    plan = _plan(model, adapter)
    # Every new tensor is computed before any parameter changes, so a failure here leaves the model untouched.
    new_values = {pid: _merged_value(plan, pid, p) for pid, p in plan.params.items()}
    new_slots = {}
    for (mod, leaf), value in plan.slots.items():
        old = getattr(model.get_submodule(mod), leaf)
        new_slots[(mod, leaf)] = value.to(device=old.device, dtype=old.dtype, copy=True)  # numerics: one cast
    originals = {}
    for pid, value in new_values.items():
        p = plan.params[pid]
        originals[pid] = (p, p.data)
        p.data = value
    slots = {}
    for (mod, leaf), value in new_slots.items():
        module = model.get_submodule(mod)
        slots[(mod, leaf)] = module._parameters[leaf]
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    setattr(model, _STATE_ATTR, _MergeState(adapter, originals, slots))


def _merged_value(plan: _Plan, pid: int, p: nn.Parameter) -> torch.Tensor:
    base = plan.inplace.get(pid)
    deltas = plan.deltas.get(pid, [])
    bias = plan.bias_deltas.get(pid)
    if not deltas and bias is None:
        # numerics: a replacement is stored in the adapter's dtype and cast once to the parameter's dtype
        return base.to(device=p.device, dtype=p.dtype, copy=True)
    # numerics: everything below runs in float32 (float64 for float64 weights) and is cast once at the end
    work = torch.float64 if p.dtype == torch.float64 else torch.float32
    w = (base if base is not None else p.data).to(device=p.device, dtype=work, copy=True)
    for d in deltas:
        w = _apply_delta(w, d, work)
    if bias is not None:
        b, scaling = bias
        w += b.to(device=w.device, dtype=work) * scaling
    return w.to(p.dtype)


def _add_delta(w: torch.Tensor, d: _Delta, work: torch.dtype) -> None:
    """w += scaling * (B @ A) (Linear) or scaling * (B @ A).T (Embedding), in place, in one fused addmm_.

    PEFT computes transpose(B @ A, fan_in_fan_out) * scaling and adds it; fan_in_fan_out is forced off for
    nn.Linear and the embedding delta is always transposed. On CPU, addmm_ gives the same bits as that
    product-then-add (checked by the tests against PEFT).
    """
    A, B = d.A.to(device=w.device, dtype=work), d.B.to(device=w.device, dtype=work)
    if d.kind == "embedding":
        A, B = B.T, A.T  # (B @ A).T == A.T @ B.T: [vocab, r] @ [r, dim]
    w.addmm_(B, A, alpha=d.scaling)


def _apply_delta(w: torch.Tensor, d: _Delta, work: torch.dtype) -> torch.Tensor:
    _add_delta(w, d, work)
    if d.magnitude is None:
        return w
    # DoRA: W' = m / ||W + dW|| * (W + dW); the norm is per output row for Linear ([out, in] rows), and per
    # embedding dimension (over the vocabulary) for Embedding, whose weight is [vocab, dim]
    m = d.magnitude.to(device=w.device, dtype=work)
    if d.kind == "linear":
        return w.mul_((m / torch.linalg.norm(w, dim=1)).view(-1, 1))
    return w.mul_((m / torch.linalg.norm(w, dim=0)).view(1, -1))


@torch.no_grad()
def unmerge(model: nn.Module) -> LoraAdapter | None:
    """Put back the original parameters (the very tensors merge() replaced: bit-identical). Returns the adapter."""
    state: _MergeState | None = getattr(model, _STATE_ATTR, None)
    if state is None:
        return None
    for p, original in state.originals.values():
        p.data = original
    for (mod, leaf), original in state.slots.items():
        model.get_submodule(mod)._parameters[leaf] = original
    delattr(model, _STATE_ATTR)
    return state.adapter


# --------------------------------------------------------------------------------------------------------------
# a directory of named adapters

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


# --------------------------------------------------------------------------------------------------------------
# merged HF checkpoint

_WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|pkl|pickle|h5|msgpack|gguf)|.*\.safetensors\.index\.json")


def write_merged_checkpoint(source: str | os.PathLike[str], adapter: LoraAdapter | str | os.PathLike[str],
                            out_dir: str | os.PathLike[str]) -> Path:
    """Write source + adapter merged as an HF checkpoint (single model.safetensors) that transformers loads.

    Weights stay in the source's dtype. A tied model whose adapter makes lm_head differ from embed_tokens is
    written untied (both tensors, tie_word_embeddings false).
    """
    from qwen_ref.checkpoint.sources import resolve_source
    from qwen_ref.checkpoint.weights import load_weights, parse_dtype
    from qwen_ref.config import QwenConfig

    src, _ = resolve_source(source)
    adapter = resolve_adapter(adapter)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LoraError(f"--out {out}: exists and is not an empty directory")
    config = QwenConfig.from_file(src / "config.json")
    model = load_weights(src, config, dtype=parse_dtype(None, config))
    merge(model, adapter)

    tensors = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters()}
    raw_config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    if config.tie_word_embeddings and head is not embed:
        if torch.equal(head, embed):
            tensors.pop("lm_head.weight", None)
        else:
            raw_config["tie_word_embeddings"] = False

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        for f in sorted(src.iterdir()):
            if f.is_file() and f.name != "config.json" and not _WEIGHT_FILE.fullmatch(f.name):
                shutil.copyfile(f, tmp / f.name)
        (tmp / "config.json").write_text(json.dumps(raw_config, indent=2) + "\n", encoding="utf-8")
        from safetensors.torch import save_file

        save_file(tensors, str(tmp / "model.safetensors"),
                  metadata={"format": "pt", "merged_lora": adapter.name})
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
