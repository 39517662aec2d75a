"""LoRA merge against PEFT's merge_and_unload on the tiny checkpoints; unmerge exactness; clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from qwen_ref.checkpoint.weights import load_weights
from qwen_ref.config import QwenConfig
from qwen_ref.lora import (
    AdapterNotFoundError,
    AdapterRegistry,
    LoraAdapter,
    LoraError,
    active_adapter,
    merge,
    resolve_adapter,
    unmerge,
    write_merged_checkpoint,
)

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore")

QKVO_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name -> (preset, LoraConfig kwargs, edits to adapter_config.json after saving)
CASES: dict[str, tuple[str, dict, dict]] = {
    "plain": ("qwen2.5", dict(r=8, lora_alpha=16, target_modules=QKVO_MLP), {}),
    # PEFT forces fan_in_fan_out off for nn.Linear (and saves false); the file says true here, as some do
    "rslora_layers": ("qwen1.5", dict(r=4, lora_alpha=8, use_rslora=True, layers_to_transform=[1],
                                      layers_pattern="layers", target_modules=["q_proj", "v_proj", "up_proj"]),
                      {"fan_in_fan_out": True}),
    "patterns_regex": ("qwen2.5", dict(
        r=4, lora_alpha=8, target_modules=r".*\.(q_proj|v_proj|o_proj|down_proj)",
        exclude_modules=r".*layers\.0\.mlp\..*",
        rank_pattern={"q_proj": 8, "model.layers.1.mlp.down_proj": 2},
        alpha_pattern={"v_proj": 32, r"layers\.0\.self_attn\.o_proj": 3}), {}),
    "all_linear": ("qwen2.5-coder-32b-shape", dict(r=4, lora_alpha=16, target_modules="all-linear",
                                                   exclude_modules=["o_proj"]),
                   {"target_modules": "all-linear"}),
    "dora": ("qwen2.5", dict(r=4, lora_alpha=8, use_dora=True, target_modules=QKVO_MLP), {}),
    "dora_embedding": ("qwen2.5-coder-32b-shape", dict(r=4, lora_alpha=8, use_dora=True,
                                                       target_modules=["embed_tokens", "v_proj"]), {}),
    "bias_all_save_lm_head": ("qwen2.5", dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], bias="all",
                                              modules_to_save=["lm_head"]), {}),
    "lora_bias": ("qwen1.5", dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"], bias="lora_only",
                                  lora_bias=True), {}),
    "save_embed_tied": ("qwen1.5", dict(r=4, lora_alpha=8, target_modules=["v_proj"],
                                        modules_to_save=["embed_tokens", "norm"]), {}),
    "embedding_tied": ("qwen2.5", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]), {}),
    "embedding_lm_head": ("qwen2.5-coder-32b-shape", dict(r=4, lora_alpha=8, modules_to_save=["norm"],
                                                          target_modules=["embed_tokens", "lm_head", "q_proj"]), {}),
}


def our_model(path: Path, dtype: torch.dtype = torch.float32):
    return load_weights(path, QwenConfig.from_file(path / "config.json"), dtype=dtype)


def hf_base(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()


def make_peft_adapter(base_dir: Path, kwargs: dict, edits: dict, out: Path, seed: int) -> Path:
    """A PEFT adapter with every trainable tensor randomised (non-zero B, moved biases/magnitudes/copies)."""
    model = peft.get_peft_model(hf_base(base_dir), peft.LoraConfig(**kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=g)
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * noise)
            elif "lora_" in name:
                p.copy_(0.1 * noise)
            else:  # biases, modules_to_save copies
                p.add_(0.05 * noise)
    model.save_pretrained(out, safe_serialization=True)
    if edits:
        cfg_path = out / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.update(edits)
        cfg_path.write_text(json.dumps(cfg))
    return out


def peft_merged(base_dir: Path, adapter_dir: Path):
    return peft.PeftModel.from_pretrained(hf_base(base_dir), adapter_dir).merge_and_unload().eval()


def snapshot(model) -> dict:
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)},
            "tied": model.lm_head.weight is model.model.embed_tokens.weight,
            "adapter": active_adapter(model)}


_PRISTINE: dict[tuple[str, torch.dtype], dict] = {}


def fresh_model(tiny, preset: str, dtype: torch.dtype = torch.float32):
    """A freshly loaded model and a snapshot of its base state (taken once per preset and dtype)."""
    model = our_model(tiny(preset), dtype)
    if (preset, dtype) not in _PRISTINE:
        _PRISTINE[preset, dtype] = snapshot(model)
    return model, _PRISTINE[preset, dtype]


def assert_unchanged(model, snap: dict) -> None:
    now = dict(model.named_parameters(remove_duplicate=False))
    assert now.keys() == snap["params"].keys()
    for name, p in now.items():
        assert torch.equal(p, snap["params"][name]), name
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == snap["tied"]
    assert active_adapter(model) is snap["adapter"]


@pytest.fixture(scope="session")
def adapters(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    built: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in built:
            preset, kwargs, edits = CASES[case]
            built[case] = make_peft_adapter(tiny(preset), kwargs, edits, root / case, seed=len(built) + 1)
        return built[case]

    return get


TOKENS = torch.tensor([[151643, 9707, 11, 1879, 0, 42, 3555, 13], [785, 3974, 13876, 38835, 34208, 916, 279, 16]])


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


def make_registry(root: Path, adapters) -> AdapterRegistry:
    root.mkdir()
    for case in ("plain", "dora", "rslora_layers"):
        shutil.copytree(adapters(case), root / case)
    return AdapterRegistry(root)


def test_registry_switches_adapters(tiny, adapters, tmp_path):
    registry = make_registry(tmp_path / "loras", adapters)
    assert registry.names() == ["dora", "plain", "rslora_layers"]
    assert registry.get("plain") is registry.get("plain")  # cached
    model, base = fresh_model(tiny, "qwen2.5")
    direct = {}
    for name in ("plain", "dora"):
        m = our_model(tiny("qwen2.5"))
        merge(m, LoraAdapter.from_dir(adapters(name)))
        direct[name] = snapshot(m)

    registry.activate(model, "plain")
    assert_unchanged(model, {**direct["plain"], "adapter": registry.get("plain")})
    data_ptr = model.model.layers[0].self_attn.q_proj.weight.data_ptr()
    registry.activate(model, "plain")  # same adapter: nothing happens
    assert model.model.layers[0].self_attn.q_proj.weight.data_ptr() == data_ptr
    registry.activate(model, "dora")
    assert_unchanged(model, {**direct["dora"], "adapter": registry.get("dora")})
    registry.activate(model, None)
    assert_unchanged(model, base)

    outside = LoraAdapter.from_dir(adapters("plain"))  # an adapter not from the registry (load(lora=PATH))
    assert registry.activate(model, outside) is outside
    assert_unchanged(model, {**direct["plain"], "adapter": outside})
    registry.activate(model, None)
    assert resolve_adapter("dora", registry) is registry.get("dora")
    assert resolve_adapter(str(adapters("dora"))).path == adapters("dora")
    with pytest.raises(AdapterNotFoundError):
        resolve_adapter("missing", registry)


BAD_NAMES = ["", ".", "..", "../plain", "plain/..", "a/b", "a\\b", "/etc", "C:\\x", "pl..ain", "a\x00b", "a\nb",
             " plain", "-x", "x" * 129, "é"]


@pytest.fixture(scope="module")
def serving(tiny, adapters, tmp_path_factory):
    """One registry and one model with "dora" merged, shared by the tests that must leave both unchanged."""
    registry = make_registry(tmp_path_factory.mktemp("serving") / "loras", adapters)
    model = our_model(tiny("qwen2.5"))
    registry.activate(model, "dora")
    return registry, model, snapshot(model)


@pytest.fixture(scope="module")
def base_model(tiny):
    """One unmerged qwen2.5 model shared by the tests that must leave it unchanged."""
    model = our_model(tiny("qwen2.5"))
    return model, snapshot(model)


@pytest.mark.parametrize("name", BAD_NAMES)
def test_registry_rejects_path_like_names(name, serving):
    registry, model, snap = serving
    with pytest.raises(LoraError, match="plain adapter name"):
        registry.activate(model, name)
    assert_unchanged(model, snap)


def test_registry_unknown_name(serving):
    registry, model, snap = serving
    with pytest.raises(AdapterNotFoundError, match="no adapter named 'nope'"):
        registry.activate(model, "nope")
    assert_unchanged(model, snap)


def test_registry_rejects_symlink_escape(tiny, adapters, tmp_path):
    registry = make_registry(tmp_path / "loras", adapters)
    outside = shutil.copytree(adapters("plain"), tmp_path / "outside")
    (registry.directory / "sneaky").symlink_to(outside, target_is_directory=True)
    with pytest.raises(LoraError, match="links outside"):
        registry.get("sneaky")


def corrupt(adapter_dir: Path, dest: Path, how: str) -> Path:
    shutil.copytree(adapter_dir, dest)
    weights = dest / "adapter_model.safetensors"
    data = weights.read_bytes()
    if how == "truncated":
        weights.write_bytes(data[: len(data) - 100])
    elif how == "garbage_header":
        weights.write_bytes(data[:8] + b"{not json" + data[17:])
    elif how == "huge_header":
        weights.write_bytes((2**40).to_bytes(8, "little") + data[8:])
    elif how == "empty":
        weights.write_bytes(b"")
    elif how == "pickle_only":
        weights.unlink()
        (dest / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    elif how == "nan":
        from safetensors.torch import load_file, save_file

        tensors = load_file(weights)
        key = next(k for k in tensors if k.endswith("lora_B.weight"))
        tensors[key][0, 0] = float("nan")
        save_file(tensors, weights)
    elif how == "bad_json":
        (dest / "adapter_config.json").write_text("{")
    return dest


@pytest.mark.parametrize("how,message", [
    ("truncated", "truncated"), ("garbage_header", "corrupt"), ("huge_header", "corrupt or truncated"),
    ("empty", "not a safetensors file"), ("pickle_only", "pickle"), ("nan", "NaN"), ("bad_json", "not valid JSON"),
])
def test_broken_adapter_files(how, message, adapters, serving):
    registry, model, snap = serving
    corrupt(adapters("plain"), registry.directory / f"broken-{how}", how)
    with pytest.raises(LoraError, match=message):
        registry.activate(model, f"broken-{how}")
    assert_unchanged(model, snap)


@pytest.mark.parametrize("field,value,message", [
    ("use_qalora", True, "use_qalora"),
    ("target_parameters", ["mlp.experts.down_proj"], "target_parameters"),
    ("layer_replication", [[0, 2], [1, 2]], "layer_replication"),
    ("alora_invocation_tokens", [1, 2], "alora_invocation_tokens"),
    ("trainable_token_indices", [5, 6], "trainable_token_indices"),
    ("init_lora_weights", "pissa_niter_4", "changes the base weights"),
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
])
def test_unsupported_config_is_refused(field, value, message, adapters, base_model, tmp_path):
    dest = shutil.copytree(adapters("plain"), tmp_path / "edited")
    cfg = json.loads((dest / "adapter_config.json").read_text())
    cfg[field] = value
    (dest / "adapter_config.json").write_text(json.dumps(cfg))
    model, snap = base_model
    with pytest.raises(LoraError, match=message):
        merge(model, LoraAdapter.from_dir(dest))
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


# ----------------------------------------------------------------------------------------------------------
# The request field `lora`, through generate()


@pytest.fixture(scope="module")
def lora_dir(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    base = tiny("qwen2.5")
    make_peft_adapter(base, dict(r=4, lora_alpha=16, target_modules=QKVO_MLP), {}, root / "alpha", seed=1)
    make_peft_adapter(base, dict(r=8, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"]), {},
                      root / "beta", seed=2)
    return root


def test_request_lora_equals_loading_the_adapter_merged(tiny, lora_dir):
    import qwen_ref
    from qwen_ref.workers_ai.generate import generate

    body = {"prompt": "Tell me all about PEP-8", "max_tokens": 12, "temperature": 0}
    served = qwen_ref.load(tiny("qwen2.5"), lora_dir=lora_dir)
    base_out = generate(qwen_ref.load(tiny("qwen2.5")), body)
    for name in ("alpha", "beta", "alpha"):  # switching back and forth unmerges the previous adapter first
        merged = qwen_ref.load(tiny("qwen2.5"), lora=lora_dir / name)
        assert generate(served, {**body, "lora": name}) == generate(merged, body)
    assert generate(served, body) == base_out  # a request without lora runs the base model
    assert generate(served, [{**body, "lora": "beta"}, {**body, "lora": "beta", "seed": 3}])[0] == \
        generate(qwen_ref.load(tiny("qwen2.5"), lora=lora_dir / "beta"), body)


@pytest.mark.parametrize(("name", "message"), [("gamma", "no adapter named 'gamma'"), ("../alpha", "lora"),
                                                ("/etc", "lora"), ("a/b", "lora")])
def test_bad_lora_names_are_clear_errors_and_leave_the_model_unchanged(tiny, lora_dir, name, message):
    import qwen_ref
    from qwen_ref.workers_ai.generate import generate
    from qwen_ref.workers_ai.validate import InvalidInput

    served = qwen_ref.load(tiny("qwen2.5"), lora_dir=lora_dir)
    generate(served, {"prompt": "x", "max_tokens": 1, "lora": "alpha"})
    before = snapshot(served.model)
    with pytest.raises(InvalidInput, match=message) as e:
        generate(served, {"prompt": "x", "max_tokens": 1, "lora": name})
    assert e.value.path == "/lora"
    after = snapshot(served.model)
    assert after["adapter"] is before["adapter"]
    assert all(torch.equal(before["params"][n], p) for n, p in after["params"].items())


def test_a_batch_mixing_adapters_is_refused(tiny, lora_dir):
    import qwen_ref
    from qwen_ref.workers_ai.generate import generate
    from qwen_ref.workers_ai.validate import InvalidInput

    served = qwen_ref.load(tiny("qwen2.5"), lora_dir=lora_dir)
    with pytest.raises(InvalidInput, match="different LoRA adapters"):
        generate(served, [{"prompt": "x", "lora": "alpha"}, {"prompt": "y", "lora": "beta"}])


def test_lora_on_a_model_without_adapters(tiny):
    import qwen_ref
    from qwen_ref.workers_ai.generate import LoraUnavailable, generate

    with pytest.raises(LoraUnavailable, match="no LoRA adapters are registered"):
        generate(qwen_ref.load(tiny("qwen2.5")), {"prompt": "x", "lora": "alpha"})


def test_merge_lora_cli_writes_a_checkpoint_transformers_loads(tiny, lora_dir, tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "merged"
    r = subprocess.run([sys.executable, "-m", "qwen_ref.cli", "merge-lora", str(tiny("qwen2.5")),
                        str(lora_dir / "alpha"), "--out", str(out)], capture_output=True, text=True, timeout=300,
                       env={**os.environ})
    assert r.returncode == 0, r.stderr
    merged = peft_merged(tiny("qwen2.5"), lora_dir / "alpha")
    ids = torch.arange(1, 11)[None] * 37
    with torch.no_grad():
        ours = our_model(out)(ids)
        theirs = merged(ids).logits
        reloaded = hf_base(out)(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (reloaded - theirs).abs().max().item() <= 1e-4
    bad = subprocess.run([sys.executable, "-m", "qwen_ref.cli", "merge-lora", str(tiny("qwen2.5")),
                          str(tmp_path / "nope"), "--out", str(tmp_path / "x")], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
