"""QwenConfig: the Qwen2-architecture fields of a checkpoint's config.json, validated."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from qwen_ref.dtypes import DTYPES
from qwen_ref.errors import ConfigError
from qwen_ref.json_files import read_json_file

ROPE_TYPES = ("default", "linear", "dynamic", "yarn")
LAYER_TYPES = ("full_attention", "sliding_attention")

# Keys a rope dict may carry, per type. "type"/"rope_type" and "rope_theta" are handled separately.
_ROPE_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor"},
    "yarn": {
        "factor",
        "original_max_position_embeddings",
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "truncate",
    },
}
# Written by some exporters beside the real parameters; they do not change the math of these types.
_ROPE_IGNORED_KEYS = {"partial_rotary_factor"}


@dataclass(frozen=True)
class RopeConfig:
    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class QwenConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    # None when sliding-window attention is off (use_sliding_window false), as HF normalises it.
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    torch_dtype: str | None = None
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()

    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QwenConfig:
        return _parse(d)

    @classmethod
    def from_file(cls, path: str | Path) -> QwenConfig:
        path = Path(path)
        d = read_json_file(path, ConfigError)
        try:
            return _parse(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json a Qwen2 checkpoint carries for this config (transformers 4.x spelling)."""
        rope: dict[str, Any] | None = None
        if self.rope.rope_type != "default":
            rope = {"type": self.rope.rope_type, "factor": self.rope.factor}
            if self.rope.rope_type == "yarn":
                rope["original_max_position_embeddings"] = self.rope.original_max_position_embeddings
                defaults = RopeConfig()
                for f in fields(RopeConfig):
                    if f.name in ("rope_type", "theta", "factor", "original_max_position_embeddings"):
                        continue
                    value = getattr(self.rope, f.name)
                    if value != getattr(defaults, f.name):
                        rope[f.name] = value
        d: dict[str, Any] = {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope.theta,
            "rope_scaling": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_sliding_window": self.sliding_window is not None,
            "sliding_window": self.sliding_window,
            "max_window_layers": _max_window_layers(self.layer_types),
            "attention_dropout": 0.0,
            "torch_dtype": self.torch_dtype or "float32",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if len(self.eos_token_id) != 1 else self.eos_token_id[0],
            "use_cache": True,
        }
        if self.head_dim != self.hidden_size // self.num_attention_heads:
            d["head_dim"] = self.head_dim
        return d


def _max_window_layers(layer_types: tuple[str, ...]) -> int:
    for i, t in enumerate(layer_types):
        if t == "sliding_attention":
            return i
    return len(layer_types)


def _get(d: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = ..., *, where: str = ""):
    name = f"{where}{key}"
    if key not in d or d[key] is None:
        if default is ...:
            raise ConfigError(f"{name}: required field is missing")
        return default
    value = d[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int subclass in Python, but a JSON true is never a valid count or size
    if isinstance(value, bool) and bool not in kinds:
        raise ConfigError(f"{name}: {value!r} is not a valid {_kind_name(kinds)}")
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kinds):
        raise ConfigError(f"{name}: {value!r} is not a valid {_kind_name(kinds)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name}: {value!r} must be finite")
    return value


def _kind_name(kinds: tuple[type, ...]) -> str:
    return " or ".join({int: "integer", float: "number", bool: "boolean", str: "string"}.get(k, k.__name__)
                       for k in kinds)


# The largest size of each field this reference accepts: well above every Qwen model (the 72B has 80 layers,
# hidden 8192, 152064 ids; Qwen2.5-1M a 1,010,000-token window), far below what would exhaust memory or time
# while the model is built, before the weights are even compared with the config.
SIZE_LIMITS = {"vocab_size": 2**22, "hidden_size": 2**17, "intermediate_size": 2**20, "num_hidden_layers": 2**12,
               "num_attention_heads": 2**10, "num_key_value_heads": 2**10, "head_dim": 2**12,
               "max_position_embeddings": 2**24}


def _in_limits(name: str, value: int) -> None:
    _positive(name, value)
    if value > SIZE_LIMITS[name]:
        raise ConfigError(f"{name}: {value} is larger than this reference accepts (at most {SIZE_LIMITS[name]})")


def _positive(name: str, value: int | float) -> None:
    if value <= 0:
        raise ConfigError(f"{name}: {value!r} must be > 0")


def _parse(d: dict[str, Any]) -> QwenConfig:
    model_type = d.get("model_type", "qwen2")
    if model_type != "qwen2":
        raise ConfigError(f"model_type: {model_type!r} is not supported; allowed: 'qwen2' (Qwen1.5/2/2.5)")
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act: {act!r} is not supported; allowed: 'silu'")

    ints = {}
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        ints[key] = _get(d, key, int)
        _in_limits(key, ints[key])
    heads = ints["num_attention_heads"]
    kv_heads = _get(d, "num_key_value_heads", int, heads)
    _in_limits("num_key_value_heads", kv_heads)
    if heads % kv_heads:
        raise ConfigError(
            f"num_key_value_heads: {kv_heads} does not divide num_attention_heads={heads}; "
            "allowed: a divisor of num_attention_heads"
        )
    if "head_dim" in d and d["head_dim"] is not None:
        head_dim = _get(d, "head_dim", int)
    else:
        if ints["hidden_size"] % heads:
            raise ConfigError(
                f"hidden_size: {ints['hidden_size']} is not a multiple of num_attention_heads={heads} "
                "and head_dim is not given"
            )
        head_dim = ints["hidden_size"] // heads
    _in_limits("head_dim", head_dim)
    if head_dim % 2:
        raise ConfigError(f"head_dim: {head_dim} must be even for rotary embeddings")

    max_pos = _get(d, "max_position_embeddings", int, 32768)
    _in_limits("max_position_embeddings", max_pos)
    eps = _get(d, "rms_norm_eps", float, 1e-6)
    _positive("rms_norm_eps", eps)

    rope = _parse_rope(d, max_pos)
    if rope.rope_type == "dynamic" and head_dim <= 2:
        raise ConfigError(f"head_dim: {head_dim} must be > 2 for dynamic rope scaling")

    num_layers = ints["num_hidden_layers"]
    use_sw = _get(d, "use_sliding_window", bool, False)
    sliding_window = _get(d, "sliding_window", int, None) if use_sw else None
    if use_sw and sliding_window is None:
        raise ConfigError("sliding_window: required (a positive integer) when use_sliding_window is true")
    if sliding_window is not None:
        _positive("sliding_window", sliding_window)
    layer_types = _parse_layer_types(d, num_layers, sliding_window)

    dtype = d.get("torch_dtype", d.get("dtype"))
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"torch_dtype: {dtype!r} is not supported; allowed: {', '.join(DTYPES)}")

    eos = d.get("eos_token_id")
    eos_ids: tuple[int, ...]
    if eos is None:
        eos_ids = ()
    elif isinstance(eos, int) and not isinstance(eos, bool):
        eos_ids = (eos,)
    elif isinstance(eos, list) and all(isinstance(e, int) and not isinstance(e, bool) for e in eos):
        eos_ids = tuple(eos)
    else:
        raise ConfigError(f"eos_token_id: {eos!r:.80} is not an integer or a list of integers")
    outside = [i for i in eos_ids if not 0 <= i < ints["vocab_size"]]
    if outside:
        raise ConfigError(f"eos_token_id: {outside[:5]} outside the vocabulary (0..{ints['vocab_size'] - 1})")

    return QwenConfig(
        **ints,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        rms_norm_eps=eps,
        rope=rope,
        tie_word_embeddings=_get(d, "tie_word_embeddings", bool, False),
        sliding_window=sliding_window,
        layer_types=layer_types,
        torch_dtype=dtype,
        bos_token_id=_get(d, "bos_token_id", int, None),
        eos_token_id=eos_ids,
    )


def _parse_layer_types(d: dict[str, Any], num_layers: int, sliding_window: int | None) -> tuple[str, ...]:
    given = d.get("layer_types")
    if given is None:
        # HF Qwen2: the layers at index >= max_window_layers slide (the top of the stack, not the bottom).
        first_sliding = _get(d, "max_window_layers", int, 28)
        return tuple(
            "sliding_attention" if sliding_window is not None and i >= first_sliding else "full_attention"
            for i in range(num_layers)
        )
    if not isinstance(given, list) or len(given) != num_layers:
        raise ConfigError(f"layer_types: expected a list of {num_layers} entries, got {given!r}")
    for i, t in enumerate(given):
        if t not in LAYER_TYPES:
            raise ConfigError(f"layer_types[{i}]: {t!r} is not supported; allowed: {', '.join(LAYER_TYPES)}")
        if t == "sliding_attention" and sliding_window is None:
            raise ConfigError(
                f"layer_types[{i}]: 'sliding_attention' contradicts use_sliding_window=false / sliding_window=null"
            )
    return tuple(given)


def _parse_rope(d: dict[str, Any], max_pos: int) -> RopeConfig:
    top_theta = _get(d, "rope_theta", float, None)
    scaling = d.get("rope_scaling")
    params = d.get("rope_parameters")
    if scaling is not None and params is not None and scaling != params:
        raise ConfigError(
            f"rope_scaling / rope_parameters: both given and they differ ({scaling!r} vs {params!r}); give one"
        )
    src_name = "rope_parameters" if params is not None else "rope_scaling"
    src = params if params is not None else scaling
    if src is None:
        src = {}
    if not isinstance(src, dict):
        raise ConfigError(f"{src_name}: {src!r} is not an object")
    if any(isinstance(v, dict) for v in src.values()):
        raise ConfigError(f"{src_name}: per-layer-type rope parameters are not supported by Qwen2")

    t1, t2 = src.get("type"), src.get("rope_type")
    if t1 is not None and t2 is not None and t1 != t2:
        raise ConfigError(f"{src_name}.type / {src_name}.rope_type: contradictory values {t1!r} and {t2!r}")
    rope_type = t2 if t2 is not None else (t1 if t1 is not None else "default")
    key = "rope_type" if t2 is not None else "type"
    if rope_type not in ROPE_TYPES:
        raise ConfigError(
            f"{src_name}.{key}: {rope_type!r} is not supported; allowed: {', '.join(ROPE_TYPES)}"
        )

    inner_theta = _get(src, "rope_theta", float, None, where=f"{src_name}.")
    if top_theta is not None and inner_theta is not None and top_theta != inner_theta:
        raise ConfigError(f"rope_theta: {top_theta!r} contradicts {src_name}.rope_theta={inner_theta!r}")
    theta = inner_theta if inner_theta is not None else (top_theta if top_theta is not None else 10000.0)
    _positive("rope_theta", theta)

    allowed = _ROPE_KEYS[rope_type]
    unknown = sorted(set(src) - allowed - _ROPE_IGNORED_KEYS - {"type", "rope_type", "rope_theta"})
    if unknown:
        raise ConfigError(
            f"{src_name}: unknown key(s) {unknown} for rope type {rope_type!r}; "
            f"allowed: {sorted(allowed) or 'none'}"
        )
    prf = src.get("partial_rotary_factor", 1.0)
    if prf != 1.0:
        raise ConfigError(f"{src_name}.partial_rotary_factor: {prf!r} is not supported; allowed: 1.0")
    if rope_type == "default":
        return RopeConfig(theta=theta)

    w = f"{src_name}."
    factor = _get(src, "factor", float, where=w)
    if factor < 1.0 if rope_type != "linear" else factor <= 0:
        raise ConfigError(f"{w}factor: {factor!r} is out of range; allowed: "
                          f"{'> 0' if rope_type == 'linear' else '>= 1'}")
    if rope_type != "yarn":
        return RopeConfig(rope_type=rope_type, theta=theta, factor=factor)

    orig = _get(src, "original_max_position_embeddings", int, None, where=w)
    if orig is None:
        orig = _get(d, "original_max_position_embeddings", int, max_pos)
    _positive(f"{w}original_max_position_embeddings", orig)
    rope = RopeConfig(
        rope_type="yarn",
        theta=theta,
        factor=factor,
        original_max_position_embeddings=orig,
        attention_factor=_get(src, "attention_factor", float, None, where=w),
        beta_fast=_get(src, "beta_fast", float, 32.0, where=w),
        beta_slow=_get(src, "beta_slow", float, 1.0, where=w),
        mscale=_get(src, "mscale", float, None, where=w),
        mscale_all_dim=_get(src, "mscale_all_dim", float, None, where=w),
        truncate=_get(src, "truncate", bool, True, where=w),
    )
    if rope.attention_factor is not None:
        _positive(f"{w}attention_factor", rope.attention_factor)
    if rope.beta_fast <= rope.beta_slow or rope.beta_slow <= 0:
        raise ConfigError(
            f"{w}beta_fast / beta_slow: {rope.beta_fast!r} / {rope.beta_slow!r}; allowed: beta_fast > beta_slow > 0"
        )
    return rope
