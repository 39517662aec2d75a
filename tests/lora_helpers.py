"""What the LoRA tests share: adapters written by PEFT itself on the tiny checkpoints, the PEFT oracles, snapshots."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qwen_ref.checkpoint.weights import load_weights
from qwen_ref.config import QwenConfig
from qwen_ref.lora import active_adapter

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

TOKENS = torch.tensor([[151643, 9707, 11, 1879, 0, 42, 3555, 13], [785, 3974, 13876, 38835, 34208, 916, 279, 16]])


def our_model(path: Path, dtype: torch.dtype = torch.float32):
    return load_weights(path, QwenConfig.from_file(path / "config.json"), dtype=dtype)


def hf_base(path: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=dtype).eval()


def make_peft_adapter(base_dir: Path, kwargs: dict, edits: dict, out: Path, seed: int, scale: float = 0.1) -> Path:
    """A PEFT adapter with every trainable tensor randomised (non-zero B, moved biases/magnitudes/copies).
    scale: the standard deviation of the LoRA tensors (0.1 changes the tiny models' logits by about 20)."""
    import peft

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
                p.copy_(scale * noise)
            else:  # biases, modules_to_save copies
                p.add_(0.05 * noise)
    model.save_pretrained(out, safe_serialization=True)
    if edits:
        cfg_path = out / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.update(edits)
        cfg_path.write_text(json.dumps(cfg))
    return out


class AdapterFactory:
    """cases: name -> (preset, LoraConfig kwargs, edits to adapter_config.json); each adapter is written once, under
    root/<name> (so its name is the case's), with make_peft_adapter's scale."""

    def __init__(self, tiny, root: Path, cases: dict[str, tuple[str, dict, dict]], scale: float = 0.1):
        self.tiny, self.root, self.cases, self.scale = tiny, root, cases, scale
        self._built: dict[str, Path] = {}

    def __call__(self, case: str) -> Path:
        if case not in self._built:
            preset, kwargs, edits = self.cases[case]
            self._built[case] = make_peft_adapter(self.tiny(preset), kwargs, edits, self.root / case,
                                                  seed=len(self._built) + 1, scale=self.scale)
        return self._built[case]


def peft_merged(base_dir: Path, adapter_dir: Path):
    import peft

    return peft.PeftModel.from_pretrained(hf_base(base_dir), adapter_dir).merge_and_unload().eval()


def peft_unmerged(base_dir: Path, adapter_dir: Path, dtype: torch.dtype = torch.float32):
    """PEFT's model with the adapter active and not merged: its LoRA layers run B(A x) beside the base layer."""
    import peft

    return peft.PeftModel.from_pretrained(hf_base(base_dir, dtype), adapter_dir).eval()


def snapshot(model) -> dict:
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)},
            "tied": model.lm_head.weight is model.model.embed_tokens.weight,
            "adapter": active_adapter(model)}


def assert_unchanged(model, snap: dict) -> None:
    now = dict(model.named_parameters(remove_duplicate=False))
    assert now.keys() == snap["params"].keys()
    for name, p in now.items():
        assert torch.equal(p, snap["params"][name]), name
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == snap["tied"]
    assert active_adapter(model) is snap["adapter"]


_PRISTINE: dict[tuple[str, torch.dtype], dict] = {}


def fresh_model(tiny, preset: str, dtype: torch.dtype = torch.float32):
    """A freshly loaded model and a snapshot of its base state (taken once per preset and dtype)."""
    model = our_model(tiny(preset), dtype)
    if (preset, dtype) not in _PRISTINE:
        _PRISTINE[preset, dtype] = snapshot(model)
    return model, _PRISTINE[preset, dtype]

