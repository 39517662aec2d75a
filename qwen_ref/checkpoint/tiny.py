"""Deterministic random-weight checkpoints in the exact HF layout, with the real Qwen2 vocabulary.

No model hub is needed: these stand in for the real checkpoints in tests, in the quick start and in
benchmarks. transformers' AutoModelForCausalLM.from_pretrained loads them too.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from qwen_ref.config import QwenConfig, RopeConfig
from qwen_ref.disk_cache import build_once, cache_root
from qwen_ref.errors import QwenRefError
from qwen_ref.tokenizer.build import default_tokenizer_dir

QWEN_VOCAB = 151936  # rows of embed/lm_head in Qwen1.5/2/2.5 up to 14B (the tokenizer knows 151665 ids)
CODER_32B_VOCAB = 152064
EOS = (151645, 151643)


@dataclass(frozen=True)
class Preset:
    config: QwenConfig
    flavor: str  # tokenizer and chat template: "qwen1.5" or "qwen2.5"
    generation: dict[str, Any] = field(default_factory=dict)
    stored_dtype: str = "float32"


def _cfg(**kw: Any) -> QwenConfig:
    base: dict[str, Any] = dict(
        vocab_size=QWEN_VOCAB, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope=RopeConfig(theta=1e6), tie_word_embeddings=True, bos_token_id=151643, eos_token_id=(151645,),
    )
    base.update(kw)
    base.setdefault("head_dim", base["hidden_size"] // base["num_attention_heads"])
    base.setdefault("layer_types", ("full_attention",) * base["num_hidden_layers"])
    return QwenConfig(**base)


QWEN15_GEN = {"bos_token_id": 151643, "do_sample": True, "eos_token_id": list(EOS), "repetition_penalty": 1.1,
              "top_p": 0.8}
QWEN25_GEN = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True, "eos_token_id": list(EOS),
              "repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8, "top_k": 20}

_qwen25_tiny = _cfg(hidden_size=112, intermediate_size=224, num_hidden_layers=2, num_attention_heads=14,
                    num_key_value_heads=2)

PRESETS: dict[str, Preset] = {
    # Qwen1.5-0.5B-Chat's structure scaled down: MHA, tied embeddings
    "qwen1.5": Preset(_cfg(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4), "qwen1.5", QWEN15_GEN),
    # Qwen2.5-0.5B-Instruct's structure scaled down: GQA 14:2 (7 query heads per KV head), tied
    "qwen2.5": Preset(_qwen25_tiny, "qwen2.5", QWEN25_GEN),
    # Qwen2.5-Coder-32B-Instruct's structure scaled down: untied, GQA 5:1, head_dim 128, vocab 152064
    "qwen2.5-coder-32b-shape": Preset(
        _cfg(vocab_size=CODER_32B_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=10, num_key_value_heads=2, head_dim=128, tie_word_embeddings=False,
             rms_norm_eps=1e-6),
        "qwen2.5", QWEN25_GEN),
    # Qwen2.5's long-context recipe: static YaRN, factor 4
    "yarn": Preset(replace(_qwen25_tiny, rope=RopeConfig(rope_type="yarn", theta=1e6, factor=4.0,
                                                         original_max_position_embeddings=32768)),
                   "qwen2.5", QWEN25_GEN),
    # The other rope types and sliding windows, at lengths a test reaches
    "linear": Preset(replace(_qwen25_tiny, rope=RopeConfig(rope_type="linear", theta=1e6, factor=2.0)),
                     "qwen2.5", QWEN25_GEN),
    "dynamic": Preset(replace(_qwen25_tiny, max_position_embeddings=48,
                              rope=RopeConfig(rope_type="dynamic", theta=1e6, factor=2.0)),
                      "qwen2.5", QWEN25_GEN),
    "sliding": Preset(replace(_qwen25_tiny, sliding_window=6, layer_types=("full_attention", "sliding_attention")),
                      "qwen2.5", QWEN25_GEN),
    # Full-size shapes for benchmarks (random weights, about 0.5B parameters)
    "qwen2.5-0.5b-shape": Preset(
        _cfg(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
             num_key_value_heads=2), "qwen2.5", QWEN25_GEN, "bfloat16"),
    "qwen1.5-0.5b-shape": Preset(
        _cfg(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
             num_key_value_heads=16), "qwen1.5", QWEN15_GEN, "bfloat16"),
}
DEFAULT_PRESET = "qwen2.5"
FORMAT_VERSION = 1  # bump when presets or the weight recipe change, so caches rebuild


def random_state_dict(config: QwenConfig, seed: int) -> dict[str, torch.Tensor]:
    """Weights with spread enough that logits are well separated (std ~3) and attention is not uniform."""
    return dict(random_tensors(config, seed))


def random_tensors(config: QwenConfig, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """random_state_dict's tensors one at a time, in its order (a checkpoint larger than memory is written as
    they come)."""
    g = torch.Generator().manual_seed(seed)
    h, inter = config.hidden_size, config.intermediate_size
    q_out = config.num_attention_heads * config.head_dim
    kv_out = config.num_key_value_heads * config.head_dim

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def linear(out: int, inp: int) -> torch.Tensor:
        return normal(out, inp, std=1 / math.sqrt(inp))

    yield "model.embed_tokens.weight", normal(config.vocab_size, h, std=3 / math.sqrt(h))
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", 1 + normal(h, std=0.1)
        yield p + "self_attn.q_proj.weight", linear(q_out, h)
        yield p + "self_attn.q_proj.bias", normal(q_out, std=0.1)
        yield p + "self_attn.k_proj.weight", linear(kv_out, h)
        yield p + "self_attn.k_proj.bias", normal(kv_out, std=0.1)
        yield p + "self_attn.v_proj.weight", linear(kv_out, h)
        yield p + "self_attn.v_proj.bias", normal(kv_out, std=0.1)
        yield p + "self_attn.o_proj.weight", linear(h, q_out)
        yield p + "post_attention_layernorm.weight", 1 + normal(h, std=0.1)
        yield p + "mlp.gate_proj.weight", linear(inter, h)
        yield p + "mlp.up_proj.weight", linear(inter, h)
        yield p + "mlp.down_proj.weight", linear(h, inter)
    yield "model.norm.weight", 1 + normal(h, std=0.1)
    if not config.tie_word_embeddings:
        yield "lm_head.weight", normal(config.vocab_size, h, std=3 / math.sqrt(h))


def write_sharded_checkpoint(config: QwenConfig, out_dir: str | Path, *, flavor: str = "qwen2.5", seed: int = 0,
                             dtype: str = "bfloat16") -> Path:
    """A random-weight checkpoint of any shapes, one safetensors shard per decoder layer (plus one for the rest)
    and an index, written tensor by tensor: a checkpoint larger than memory (benchmarks/bench_offload.py)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = replace(config, torch_dtype=dtype)
    torch_dtype = getattr(torch, dtype)
    shards: dict[str, dict[str, torch.Tensor]] = {}
    weight_map: dict[str, str] = {}

    def flush(shard: str) -> None:
        save_file(shards.pop(shard), str(out / shard), metadata={"format": "pt"})

    for name, tensor in random_tensors(config, seed):
        layer = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        shard = f"model-{layer}.safetensors"
        if shard not in shards:
            for done in [s for s in shards if s != "model-rest.safetensors"]:
                flush(done)
            shards[shard] = {}
        shards[shard][name] = tensor.to(torch_dtype).contiguous()
        weight_map[name] = shard
    for shard in list(shards):
        flush(shard)
    _write_json(out / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
    hf_config = config.to_hf_dict()
    hf_config["transformers_version"] = "4.43.1"
    _write_json(out / "config.json", hf_config)
    for f in sorted(default_tokenizer_dir(flavor).iterdir()):
        if f.is_file():
            shutil.copyfile(f, out / f.name)
    return out


def make_tiny_checkpoint(preset: str, out_dir: str | Path, *, seed: int = 0, dtype: str | None = None,
                         with_tokenizer: bool = True, layers: int | None = None) -> Path:
    """A random-weight checkpoint of the preset's shapes; `layers` keeps only that many decoder layers."""
    if preset not in PRESETS:
        raise QwenRefError(f"preset: {preset!r} is unknown; allowed: {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    dtype = dtype or spec.stored_dtype
    config = replace(spec.config, torch_dtype=dtype)
    if layers is not None:
        if not 1 <= layers <= config.num_hidden_layers:
            raise QwenRefError(f"layers: {layers} is out of range; allowed: 1..{config.num_hidden_layers}")
        config = replace(config, num_hidden_layers=layers, layer_types=config.layer_types[:layers])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    torch_dtype = getattr(torch, dtype)
    sd = {k: v.to(torch_dtype).contiguous() for k, v in random_state_dict(config, seed).items()}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf_config = config.to_hf_dict()
    hf_config["transformers_version"] = "4.43.1"
    _write_json(out / "config.json", hf_config)
    _write_json(out / "generation_config.json", {**spec.generation, "transformers_version": "4.43.1"})
    if with_tokenizer:
        for f in sorted(default_tokenizer_dir(spec.flavor).iterdir()):
            if f.is_file():
                shutil.copyfile(f, out / f.name)
    return out


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def cached_tiny_checkpoint(preset: str = DEFAULT_PRESET) -> Path:
    """The embedded default model: built on first use into the cache, atomically (safe against races)."""
    target = cache_root() / "checkpoints" / f"tiny-{preset}-v{FORMAT_VERSION}"
    return build_once(target, lambda tmp: make_tiny_checkpoint(preset, tmp), "config.json")
