"""An adapter checked against a model: the plan of every change a merge makes, or a LoraError.

build_plan() touches nothing. It checks the architecture, that every targeted module exists, is a Linear or an
Embedding and has tensors of the right shapes, that there are no stray tensors, and that every replacement names
a parameter of the same shape. The merge (merge.py) and the per-row path (rows.py) both start from this plan.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qwen_ref.lora.adapter import LoraAdapter
from qwen_ref.lora.config import AdapterConfig, LoraError
from qwen_ref.lora.targets import EMBEDDING_NAMES, saved_modules, target_modules


@dataclass
class Delta:
    """One targeted module's LoRA: W' = W + scaling * (B @ A) (transposed for an Embedding), DoRA if magnitude."""

    module: str
    kind: str  # "linear" or "embedding"
    scaling: float
    A: torch.Tensor
    B: torch.Tensor
    magnitude: torch.Tensor | None


@dataclass
class Plan:
    deltas: dict[int, list[Delta]] = field(default_factory=dict)  # id(weight Parameter) -> deltas, in order
    bias_deltas: dict[int, tuple[torch.Tensor, float]] = field(default_factory=dict)  # id(bias Parameter) -> (b, s)
    inplace: dict[int, torch.Tensor] = field(default_factory=dict)  # id(Parameter) -> replacement value
    slots: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)  # (module, param) -> untied value
    params: dict[int, nn.Parameter] = field(default_factory=dict)


def check(model: nn.Module, adapter: LoraAdapter) -> None:
    """Raise LoraError if the adapter does not fit the model; touches nothing."""
    build_plan(model, adapter)


def build_plan(model: nn.Module, adapter: LoraAdapter) -> Plan:
    cfg, where = adapter.config, f"adapter {adapter.name!r}"
    _check_architecture(model, adapter)
    modules = dict(model.named_modules(remove_duplicate=False))
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = tied_names(model)
    if cfg.ensure_weight_tying and tied and (
        any(m.split(".")[-1] in EMBEDDING_NAMES for m in cfg.modules_to_save)
        or any(n.split(".")[-1] in EMBEDDING_NAMES for n in target_modules(cfg, model))
    ):
        raise LoraError(f"{where}: ensure_weight_tying=true on tied embeddings is not supported")

    targets = target_modules(cfg, model)
    if not targets and (cfg.target_modules or adapter.lora):
        raise LoraError(f"{where}: target_modules {_show(cfg.target_modules)} match no module of the model")
    plan = Plan()
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
        raise LoraError(f"{where}: LoRA tensors for {some_names(stray)}, which the config does not target "
                        f"(target_modules {_show(cfg.target_modules)}) or the model does not have")
    for ds in plan.deltas.values():
        if len(ds) > 1 and any(d.magnitude is not None for d in ds):
            raise LoraError(f"{where}: DoRA on tied weights ({', '.join(d.module for d in ds)}) is not supported")

    saved = set(saved_modules(cfg, model, adapter.replacements))
    for mod in sorted(saved):
        missing = [f"{mod}.{p}" for p, _ in modules[mod].named_parameters()
                   if f"{mod}.{p}" not in adapter.replacements]
        if missing:
            raise LoraError(f"{where}: modules_to_save names {mod} but the adapter lacks {some_names(missing)}")
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
               tensors: dict[str, torch.Tensor] | None) -> Delta:
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
    return Delta(name, kind, cfg.scaling(name), tensors[a_key], tensors[b_key], magnitude)


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


def tied_names(model: nn.Module) -> set[str]:
    """Names of parameters that share their Parameter object with another name."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {n for names in by_id.values() if len(names) > 1 for n in names}


def _show(targets: Any) -> str:
    return repr(sorted(targets)) if isinstance(targets, frozenset) else repr(targets)


def some_names(names: list[str], n: int = 8) -> str:
    """The first n names, and how many there are when there are more."""
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")
