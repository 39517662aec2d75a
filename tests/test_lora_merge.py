"""LoRA merge against PEFT's merge_and_unload on the tiny checkpoints; unmerge exactness; clear errors."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from lora_helpers import (
    CASES,
    TOKENS,
    AdapterFactory,
    assert_unchanged,
    fresh_model,
    hf_base,
    make_peft_adapter,
    our_model,
    peft_merged,
    snapshot,
)

from qwen_ref.lora import LoraAdapter, LoraError, active_adapter, merge, unmerge, write_merged_checkpoint

pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def adapters(tiny, tmp_path_factory):
    return AdapterFactory(tiny, tmp_path_factory.mktemp("adapters"), CASES)


@pytest.fixture(scope="module")
def base_model(tiny):
    """One unmerged qwen2.5 model shared by the tests that must leave it unchanged."""
    model = our_model(tiny("qwen2.5"))
    return model, snapshot(model)


@pytest.mark.parametrize("case", list(CASES))
def test_merge_matches_peft(case, tiny, adapters):
    preset = CASES[case][0]
    base_dir, adapter_dir = tiny(preset), adapters(case)
    reference = peft_merged(base_dir, adapter_dir)
    ref_state = reference.state_dict()

    model, before = fresh_model(tiny, preset)
    adapter = LoraAdapter.from_dir(adapter_dir)
    merge(model, adapter)
    assert active_adapter(model) is adapter
    changed = 0
    for name, p in model.named_parameters(remove_duplicate=False):
        torch.testing.assert_close(p, ref_state[name], rtol=0, atol=1e-6, msg=name)
        changed += not torch.equal(p, before["params"][name])
    assert changed > 0
    with torch.no_grad():
        ours, theirs = model(TOKENS), reference(TOKENS).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)

    assert unmerge(model) is adapter
    assert_unchanged(model, {**before, "adapter": None})


@pytest.mark.parametrize("case", ["plain", "dora", "bias_all_save_lm_head", "embedding_tied"])
def test_unmerge_is_bit_identical_in_bf16(case, tiny, adapters):
    # float32 is covered by test_merge_matches_peft, which unmerges every case
    model, before = fresh_model(tiny, CASES[case][0], torch.bfloat16)
    adapter = LoraAdapter.from_dir(adapters(case))
    for _ in range(2):
        merge(model, adapter)
        assert any(not torch.equal(p, before["params"][n])
                   for n, p in model.named_parameters(remove_duplicate=False))
        unmerge(model)
        assert_unchanged(model, before)
    assert unmerge(model) is None  # nothing merged: a no-op


def test_tied_embeddings_follow_peft(tiny, adapters):
    model = our_model(tiny("qwen2.5"))
    merge(model, LoraAdapter.from_dir(adapters("bias_all_save_lm_head")))
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # modules_to_save copy: untied
    unmerge(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    merge(model, LoraAdapter.from_dir(adapters("embedding_tied")))
    assert model.lm_head.weight is model.model.embed_tokens.weight  # a delta on a tied weight changes both


def test_second_merge_is_refused(tiny, adapters):
    model = our_model(tiny("qwen2.5"))
    first = LoraAdapter.from_dir(adapters("plain"))
    merge(model, first)
    snap = snapshot(model)
    with pytest.raises(LoraError, match="already merged"):
        merge(model, LoraAdapter.from_dir(adapters("dora")))
    assert_unchanged(model, snap)


SLOW = r"(?:.|..|...)+j\d"  # exponentially many ways to split a module name, none of which ends the match


@pytest.mark.parametrize("field,value,message", [
    ("use_qalora", True, "use_qalora"),
    ("target_parameters", ["mlp.experts.down_proj"], "target_parameters"),
    ("layer_replication", [[0, 2], [1, 2]], "layer_replication"),
    ("alora_invocation_tokens", [1, 2], "alora_invocation_tokens"),
    ("trainable_token_indices", [5, 6], "trainable_token_indices"),
    ("init_lora_weights", "pissa_niter_4", "changes the base weights"),
    ("init_lora_weights", "astra", "changes the base weights"),  # PEFT 0.22: projects the base weight
    ("peft_type", "IA3", "peft_type"),
    ("task_type", "SEQ_CLS", "task_type"),
    ("some_future_field", 1, "unknown field"),
    ("r", 0, "positive integer"),
    ("bias", "some", "bias"),
    ("r", 16, r"lora A \(rank 16\) has shape \(8, 112\)"),
    ("rank_pattern", {"q_proj": 4}, r"q_proj lora A \(rank 4\)"),
    ("target_modules", ["q_proj"], "which the config does not target"),
    ("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "norm"],
     "RMSNorm"),
    ("target_modules", ["nothing_here"], "match no module"),
    ("use_dora", True, "lacks its magnitude"),
    ("lora_bias", True, "has no lora_B.bias"),
    ("model_type", "llama", "not a Qwen model"),
    # patterns that backtrack without end under re: refused in bounded time (lora/patterns.py). The issue's
    # "(.+)+X" fails fast under the regex library (no X in any name); SLOW backtracks there too
    ("target_modules", "(.+)+X", "match no module"),
    ("target_modules", SLOW, "took over"),
    ("exclude_modules", SLOW, "took over"),
    ("rank_pattern", {SLOW: 4}, "took over"),
    ("alpha_pattern", {SLOW: 4}, "took over"),
    ("layers_pattern", [SLOW], "took over"),
    ("target_modules", "a" * 1001, "at most 1000"),
    ("target_modules", "(" * 600 + ")" * 600, "at most 1000|not a valid"),
    ("target_modules", "(unclosed", "not a valid regular expression"),
])
def test_unsupported_config_is_refused(field, value, message, adapters, base_model, tmp_path):
    dest = shutil.copytree(adapters("plain"), tmp_path / "edited")
    cfg = json.loads((dest / "adapter_config.json").read_text())
    cfg[field] = value
    if field == "layers_pattern":
        cfg["layers_to_transform"] = [0]
    (dest / "adapter_config.json").write_text(json.dumps(cfg))
    model, snap = base_model
    started = time.monotonic()
    with pytest.raises(LoraError, match=message):
        merge(model, LoraAdapter.from_dir(dest))
    assert time.monotonic() - started < 10
    assert_unchanged(model, snap)


def test_adapter_for_another_architecture(tiny, adapters, tmp_path):
    model, snap = fresh_model(tiny, "qwen2.5")
    other = adapters("rslora_layers")  # made on the qwen1.5 tiny (hidden 64, MHA)
    with pytest.raises(LoraError, match="architecture differs: hidden_size 64 there, 112 here"):
        merge(model, LoraAdapter.from_dir(other))
    assert_unchanged(model, snap)
    # without the base model path, the tensor shapes catch it, naming the module
    dest = shutil.copytree(other, tmp_path / "nameless")
    cfg = json.loads((dest / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None
    (dest / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoraError, match=r"model.layers.1.self_attn.q_proj lora A \(rank 4\) has shape \(4, 64\), "
                                        r"the model needs \(4, 112\)"):
        merge(model, LoraAdapter.from_dir(dest))
    assert_unchanged(model, snap)


def test_lora_bias_on_a_layer_without_bias(tiny, tmp_path):
    base_dir = tiny("qwen2.5")
    dest = make_peft_adapter(base_dir, dict(r=4, target_modules=["o_proj"], lora_bias=True), {}, tmp_path / "a", 7)
    model, snap = fresh_model(tiny, "qwen2.5")
    with pytest.raises(LoraError, match="o_proj: lora_bias is set but the layer has no bias"):
        merge(model, LoraAdapter.from_dir(dest))
    assert_unchanged(model, snap)


@pytest.mark.parametrize("case,tied_after", [("bias_all_save_lm_head", False), ("embedding_tied", True)])
def test_write_merged_checkpoint(case, tied_after, tiny, adapters, tmp_path):
    base_dir = tiny(CASES[case][0])
    out = write_merged_checkpoint(base_dir, adapters(case), tmp_path / "merged")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied_after
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        names, metadata = set(f.keys()), f.metadata()
    assert ("lm_head.weight" in names) is not tied_after
    assert metadata["merged_lora"] == case

    loaded = hf_base(out)
    reference = peft_merged(base_dir, adapters(case))
    with torch.no_grad():
        torch.testing.assert_close(loaded(TOKENS).logits, reference(TOKENS).logits, rtol=0, atol=1e-4)
    with pytest.raises(LoraError, match="not an empty directory"):
        write_merged_checkpoint(base_dir, adapters(case), out)



def test_modules_to_save_reads_both_peft_matching_rules(tiny):
    # "norm" names model.norm by its last name component (PEFT >= 0.22, and before); PEFT <= 0.21 also saved every
    # module whose name merely ends with "norm" (input_layernorm, ...). The file tells which rule wrote it.
    from qwen_ref.lora.config import AdapterConfig
    from qwen_ref.lora.targets import saved_modules

    model = our_model(tiny("qwen1.5"))
    cfg = AdapterConfig.from_dict({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["v_proj"],
                                   "modules_to_save": ["norm"]})
    assert saved_modules(cfg, model, {"model.norm.weight"}) == ["model.norm"]  # as PEFT 0.22 saves it
    old_style = {f"{n}.weight" for n, _ in model.named_modules() if n.endswith("norm")}  # as PEFT 0.21 saved it
    assert sorted(saved_modules(cfg, model, old_style)) == sorted(n for n, _ in model.named_modules()
                                                                  if n.endswith("norm"))
    assert len(old_style) > 1
    # a component match is saved whether or not the file holds it: a missing tensor is then the plan's error
    assert saved_modules(cfg, model, set()) == ["model.norm"]
