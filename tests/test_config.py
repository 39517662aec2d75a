from __future__ import annotations

import json
from dataclasses import replace

import pytest

from qwen_ref.checkpoint.tiny import PRESETS
from qwen_ref.config import QwenConfig
from qwen_ref.errors import ConfigError

BASE = {
    "model_type": "qwen2",
    "vocab_size": 1000,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
}


def cfg(**over):
    d = dict(BASE)
    d.update(over)
    return QwenConfig.from_dict(d)


def test_eos_ids_outside_the_vocabulary_are_refused_at_load():
    with pytest.raises(ConfigError, match=r"eos_token_id: \[1000\] outside the vocabulary \(0..999\)"):
        cfg(eos_token_id=[999, 1000])


@pytest.mark.parametrize(("field", "value"), [("head_dim", 10**9), ("num_hidden_layers", 100_000),
                                              ("vocab_size", 10**10), ("max_position_embeddings", 10**30),
                                              ("num_key_value_heads", 2**11), ("intermediate_size", 2**21)])
def test_sizes_beyond_any_model_are_refused_before_building(field, value):
    with pytest.raises(ConfigError, match=f"{field}: {value} is larger than this reference accepts"):
        cfg(**{field: value})


def test_basic_fields():
    c = cfg(eos_token_id=[151645, 151643], torch_dtype="bfloat16", vocab_size=151936)
    assert c.head_dim == 16 and c.num_key_value_groups == 2
    assert c.eos_token_id == (151645, 151643)
    assert c.torch_dtype == "bfloat16"
    assert c.rope.rope_type == "default" and c.rope.theta == 1e6
    assert c.layer_types == ("full_attention", "full_attention") and c.sliding_window is None


@pytest.mark.parametrize(
    "spelling",
    [
        {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},
        {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},
        {"rope_scaling": {"type": "yarn", "rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 32768}},
        # transformers v5: rope_parameters, with rope_theta inside
        {"rope_theta": None, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                                                 "original_max_position_embeddings": 32768}},
    ],
)
def test_rope_spellings_agree(spelling):
    c = cfg(**spelling)
    assert c.rope.rope_type == "yarn"
    assert c.rope.factor == 4.0 and c.rope.original_max_position_embeddings == 32768
    assert c.rope.theta == 1e6 and c.rope.truncate is True and c.rope.beta_fast == 32.0


def test_yarn_original_max_defaults_to_max_position_embeddings():
    c = cfg(rope_scaling={"type": "yarn", "factor": 2.0})
    assert c.rope.original_max_position_embeddings == 4096


def test_v5_default_rope_parameters():
    c = cfg(rope_theta=None, rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    assert c.rope.rope_type == "default" and c.rope.theta == 5000.0


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"rope_scaling": {"type": "longrope", "factor": 2.0}}, "rope_scaling.type"),
        ({"rope_scaling": {"rope_type": "su"}}, "rope_scaling.rope_type"),
        ({"rope_scaling": {"type": "yarn", "rope_type": "linear", "factor": 2.0}}, "rope_scaling.type"),
        ({"rope_scaling": {"type": "linear"}}, "rope_scaling.factor"),
        ({"rope_scaling": {"type": "linear", "factor": 0}}, "rope_scaling.factor"),
        ({"rope_scaling": {"type": "dynamic", "factor": 0.5}}, "rope_scaling.factor"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0, "low_freq_factor": 1}}, "rope_scaling"),
        ({"rope_scaling": {"type": "yarn", "factor": 4.0, "beta_fast": 1, "beta_slow": 32}}, "beta_fast"),
        ({"rope_scaling": "yarn"}, "rope_scaling"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0},
          "rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "rope_parameters"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 10.0}}, "rope_theta"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
        ({"model_type": "llama"}, "model_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"hidden_size": 66}, "hidden_size"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"vocab_size": True}, "vocab_size"),
        ({"vocab_size": "1000"}, "vocab_size"),
        ({"rms_norm_eps": -1.0}, "rms_norm_eps"),
        ({"rope_theta": float("nan")}, "rope_theta"),
        ({"num_hidden_layers": None}, "num_hidden_layers"),
        ({"use_sliding_window": True, "sliding_window": None}, "sliding_window"),
        ({"layer_types": ["full_attention"]}, "layer_types"),
        ({"layer_types": ["full_attention", "chunked_attention"]}, "layer_types[1]"),
        ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types[1]"),
        ({"torch_dtype": "int8"}, "torch_dtype"),
        ({"eos_token_id": "151645"}, "eos_token_id"),
        ({"head_dim": 15}, "head_dim"),
    ],
)
def test_bad_values_name_the_field(over, field):
    with pytest.raises(ConfigError) as e:
        cfg(**over)
    assert field in str(e.value)


def test_missing_required_field():
    d = dict(BASE)
    del d["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size: required"):
        QwenConfig.from_dict(d)


def test_sliding_window_layers_follow_transformers_rule():
    """HF: layers with index >= max_window_layers slide (the top of the stack)."""
    c = cfg(num_hidden_layers=4, use_sliding_window=True, sliding_window=128, max_window_layers=1)
    assert c.layer_types == ("full_attention",) + ("sliding_attention",) * 3
    off = cfg(num_hidden_layers=4, use_sliding_window=False, sliding_window=128, max_window_layers=1)
    assert off.sliding_window is None and set(off.layer_types) == {"full_attention"}


def test_from_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        QwenConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        QwenConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "rope_scaling": {"type": "ntk2"}}))
    with pytest.raises(ConfigError, match=r"config\.json: rope_scaling\.type: 'ntk2'"):
        QwenConfig.from_file(tmp_path / "config.json")


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_hf_dict_round_trips(preset):
    c = replace(PRESETS[preset].config, torch_dtype="bfloat16")
    assert QwenConfig.from_dict(c.to_hf_dict()) == c


def test_transformers_reads_our_config_the_same_way(tmp_path):
    from transformers import Qwen2Config

    d = {**BASE, "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}}
    hf = Qwen2Config.from_dict(d)
    ours = QwenConfig.from_dict(d)
    assert hf.rope_parameters["rope_type"] == ours.rope.rope_type
    assert hf.rope_parameters["factor"] == ours.rope.factor
    assert hf.rope_parameters["original_max_position_embeddings"] == ours.rope.original_max_position_embeddings
