"""Per-row unmerged LoRA (qwen_ref.lora.RowAdapters) against PEFT's unmerged forward, and its refusals.

Tolerances. Each adapter branch is bit-identical to PEFT's own LoRA layer forward (plain, lora_bias and DoRA; float32,
bfloat16 and float64), given the same input and base output: test_branch_is_bit_identical_to_peft_layer. So the
logits differ from PEFT's only by the base model's float32 rounding against transformers, carried through the
adapted activations. With no adapter that difference is already 1.0e-5 on these tokens (about 5 float32 ulps at the
tiny models' logit scale of 16; DESIGN's bound for the base model is 1e-4), and with an adapter it was measured at
up to 1.14e-5. LOGIT_TOL is twice the base model's own difference; 1e-5 itself cannot hold where the base alone
reaches it. Exactness per row (per_row=True) is bit for bit: torch.equal.
"""

from __future__ import annotations

import gc
import shutil

import pytest
import torch
from lora_helpers import CASES, QKVO_MLP, TOKENS, AdapterFactory, hf_base, our_model, peft_unmerged, snapshot

from qwen_ref.lora import LoraAdapter, LoraError, RowAdapters, check_unmerged, merge, rows, unmerge
from qwen_ref.models.kv_cache import KVCache, RowCaches

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore")

LOGIT_TOL = 2e-5
SCALE = 0.03  # LoRA tensors of this size change the logits by 0.6 to 10: a fine-tune's order of effect

# name -> (preset, LoraConfig kwargs, edits): adapters the per-row path supports
ROW_CASES: dict[str, tuple[str, dict, dict]] = {
    "qkvo": ("qwen2.5", dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), {}),
    "all_linear_patterns": ("qwen2.5-coder-32b-shape", dict(
        r=4, lora_alpha=16, use_rslora=True, target_modules="all-linear",
        rank_pattern={"q_proj": 8, "model.layers.1.mlp.down_proj": 2},
        alpha_pattern={"v_proj": 32, r"layers\.0\.self_attn\.o_proj": 3}), {"target_modules": "all-linear"}),
    "lora_bias": ("qwen1.5", dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True),
                  {}),
    "dora": ("qwen2.5", dict(r=4, lora_alpha=8, use_dora=True, target_modules=QKVO_MLP), {}),
    # PEFT also saves lm_head.weight (unchanged) when lm_head is targeted: a replacement equal to the base
    "lm_head_untied": ("qwen2.5-coder-32b-shape", dict(r=4, lora_alpha=8, target_modules=["lm_head", "down_proj"]),
                       {}),
}


@pytest.fixture(scope="module")
def row_adapters(tiny, tmp_path_factory):
    return AdapterFactory(tiny, tmp_path_factory.mktemp("row_adapters"), ROW_CASES, scale=SCALE)


REFUSED = {**CASES, "lm_head_tied": ("qwen2.5", dict(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"]), {})}


@pytest.fixture(scope="module")
def refused(tiny, tmp_path_factory):
    return AdapterFactory(tiny, tmp_path_factory.mktemp("refused"), REFUSED)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("case", list(ROW_CASES))
def test_one_adapter_matches_peft_unmerged(case, tiny, row_adapters):
    base_dir, adapter_dir = tiny(ROW_CASES[case][0]), row_adapters(case)
    model, adapter = our_model(base_dir), LoraAdapter.from_dir(adapter_dir)
    check_unmerged(model, adapter)
    before = snapshot(model)
    with torch.no_grad():
        ours = model(TOKENS, lora=RowAdapters(model, [adapter] * len(TOKENS)))
        theirs = peft_unmerged(base_dir, adapter_dir)(TOKENS).logits
        plain = model(TOKENS)
    assert max_diff(ours, theirs) <= LOGIT_TOL
    assert max_diff(ours, plain) > 0.5  # the adapter matters
    for name, p in model.named_parameters(remove_duplicate=False):
        assert torch.equal(p, before["params"][name]), name  # nothing merged


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", list(ROW_CASES))
def test_branch_is_bit_identical_to_peft_layer(case, dtype, tiny, row_adapters):
    """Same input x and base output y: our branch's result equals PEFT's LoRA layer forward bit for bit.

    Except float64 DoRA: its norm's W + scaling * B @ A is the merge's one addmm_, which float64 BLAS rounds once
    where PEFT's product-then-sum rounds twice (float32 BLAS gives PEFT's bits): measured 8.9e-16 apart."""
    base_dir, adapter_dir = tiny(ROW_CASES[case][0]), row_adapters(case)
    model, adapter = our_model(base_dir, dtype), LoraAdapter.from_dir(adapter_dir)
    reference = peft_unmerged(base_dir, adapter_dir, dtype)
    if dtype == torch.float64:
        reference = reference.double()  # PEFT keeps the adapter weights in float32 otherwise
    ours, modules = RowAdapters(model, [adapter, adapter]), dict(model.named_modules())
    g = torch.Generator().manual_seed(0)
    compared = 0
    for name, layer in reference.base_model.model.named_modules():
        if not isinstance(layer, peft.tuners.lora.LoraLayer) or "default" not in layer.lora_A:
            continue
        base = modules[name]
        x = torch.randn(2, 5, base.in_features, generator=g).to(dtype)
        with torch.no_grad():
            y = torch.nn.functional.linear(x, base.weight, base.bias)
            if case == "dora" and dtype == torch.float64:
                assert max_diff(ours.apply(base, x, y), layer(x)) <= 1e-14, name
            else:
                assert torch.equal(ours.apply(base, x, y), layer(x)), name
        compared += 1
    assert compared == len(adapter.lora)


@pytest.fixture(scope="module")
def mixed(tiny, row_adapters):
    """qwen2.5 with two adapters for it: plain q/k/v/o, and DoRA on every linear layer."""
    base_dir = tiny("qwen2.5")
    a1, a2 = LoraAdapter.from_dir(row_adapters("qkvo")), LoraAdapter.from_dir(row_adapters("dora"))
    refs = [peft_unmerged(base_dir, row_adapters("qkvo")), hf_base(base_dir),
            peft_unmerged(base_dir, row_adapters("dora"))]
    return our_model(base_dir), [a1, None, a2], refs


IDS = torch.tensor([[151643, 9707, 11, 1879, 0, 42, 3555, 13], [785, 3974, 13876, 38835, 34208, 916, 279, 16],
                    [3, 1000, 77, 5, 9, 23456, 8, 150000]])


@pytest.mark.parametrize("per_row", [False, True])
def test_a_batch_mixing_adapters_matches_each_oracle(per_row, mixed):
    model, adapters, refs = mixed
    with torch.no_grad():
        ours = model(IDS, lora=RowAdapters(model, adapters, per_row=per_row))
        for b, ref in enumerate(refs):
            assert max_diff(ours[b], ref(IDS[b : b + 1]).logits[0]) <= LOGIT_TOL, b


def test_per_row_rows_are_bit_identical_to_a_batch_of_one(mixed):
    """Every targeted layer, prefill-shaped inputs: row b of the batch == the same row through RowAdapters alone."""
    model, (a1, _, a2), _ = mixed
    adapters = [a1, None, a2, a1]
    batch = RowAdapters(model, adapters, per_row=True)
    g = torch.Generator().manual_seed(1)
    for layer in (m for m in model.modules() if isinstance(m, torch.nn.Linear)):
        x = torch.randn(4, 6, layer.in_features, generator=g)
        with torch.no_grad():
            y = torch.nn.functional.linear(x, layer.weight, layer.bias)
            out = batch.apply(layer, x, y)
            for b, adapter in enumerate(adapters):
                alone = RowAdapters(model, [adapter], per_row=True).apply(layer, x[b : b + 1].clone(),
                                                                         y[b : b + 1].clone())
                assert torch.equal(out[b], alone[0]), (layer, b)
            assert torch.equal(out[1], y[1])  # the row without an adapter is the base output


def test_right_padding_and_a_kv_cache(mixed):
    """Prompts of 5, 8 and 3 tokens right-padded into one prefill, then decode steps, rows [a1, None, a2]."""
    model, adapters, refs = mixed
    prompts = [IDS[0, :5].tolist(), IDS[1].tolist(), IDS[2, :3].tolist()]
    fed = [[17, 4242, 99], [5, 6, 7], [150000, 1, 2]]
    cache = KVCache(model.config, 3, 16, dtype=torch.float32)
    lora = RowAdapters(model, adapters)
    padded = torch.tensor([p + [0] * (8 - len(p)) for p in prompts])
    with torch.no_grad():
        steps = [model(padded, cache=cache, num_new=torch.tensor([5, 8, 3]), last_only=True, lora=lora)[:, 0]]
        for k in range(3):
            steps.append(model(torch.tensor([[f[k]] for f in fed]), cache=cache, lora=lora)[:, 0])
        for b, ref in enumerate(refs):
            theirs = ref(torch.tensor([prompts[b] + fed[b]])).logits[0, len(prompts[b]) - 1 :]
            assert max_diff(torch.stack([s[b] for s in steps]), theirs) <= LOGIT_TOL, b


def test_per_row_decode_is_bit_identical_to_decoding_alone(tiny, mixed):
    """The engine's exact mode: prompts prefilled alone, then batched decode steps over each row's own cache with
    batch-invariant decode linears; per_row=True makes each row's logits those of the row decoding alone."""
    from qwen_ref.models.backends import resolve_backends

    _, adapters, _ = mixed
    model = our_model(tiny("qwen2.5"))
    try:
        model.backends = resolve_backends(model, decode_linear="invariant")
    except Exception as e:  # no C++ compiler: the invariant kernel is optional
        pytest.skip(f"decode_linear='invariant' unavailable: {e}")
    prompts = [IDS[0, :5], IDS[1], IDS[2, :3]]
    together, alone = [], []
    with torch.inference_mode():
        for prompt, adapter in zip(prompts, adapters):
            cache = KVCache(model.config, 1, 16, dtype=torch.float32)
            model(prompt[None], cache=cache, last_only=True, lora=RowAdapters(model, [adapter], per_row=True))
            together.append(cache)
            alone.append(cache.clone())
            alone[-1].grow(16)  # a clone holds only the positions in use
        for token in ([17, 5, 150000], [4242, 6, 1], [99, 7, 2]):
            batch = model(torch.tensor(token)[:, None], cache=RowCaches(together),
                          lora=RowAdapters(model, adapters, per_row=True))[:, 0]
            for b, adapter in enumerate(adapters):
                one = model(torch.tensor([[token[b]]]), cache=alone[b],
                            lora=RowAdapters(model, [adapter], per_row=True))[0, 0]
                assert torch.equal(batch[b], one), b


# ----------------------------------------------------------------------------------------------------------
# refusals


@pytest.mark.parametrize("case,feature", [
    ("embedding_tied", r"LoRA on the embedding model\.embed_tokens \(lora_embedding_A/B\)"),
    ("dora_embedding", "LoRA on the embedding model.embed_tokens"),
    ("lm_head_tied", "LoRA on lm_head, whose weight is tied to the embedding"),
    ("bias_all_save_lm_head", r"modules_to_save \['lm_head'\], whose saved copies replace lm_head\.weight.*"
                              r"bias='all': trained biases"),
    ("lora_bias", "bias='lora_only': trained biases that replace the base ones"),
    ("save_embed_tied", r"modules_to_save \['embed_tokens', 'norm'\]"),
])
def test_what_needs_a_merge_is_refused(case, feature, tiny, refused):
    model = our_model(tiny(REFUSED[case][0]))
    adapter = LoraAdapter.from_dir(refused(case))
    before = snapshot(model)
    for attempt in (lambda: check_unmerged(model, adapter), lambda: RowAdapters(model, [None, adapter])):
        with pytest.raises(LoraError, match=feature) as e:
            attempt()
        message = str(e.value)
        assert message.startswith(f"adapter {case!r} cannot be applied unmerged per row: ")
        assert message.endswith("Merge it at load instead: qwen_ref.load(source, lora=...)")
    merge(model, adapter)  # what the message advises works
    unmerge(model)
    for name, p in model.named_parameters(remove_duplicate=False):
        assert torch.equal(p, before["params"][name]), name


def test_a_trained_replacement_is_refused(tiny, row_adapters, tmp_path):
    from safetensors.torch import load_file, save_file

    dest = shutil.copytree(row_adapters("qkvo"), tmp_path / "with_norm")
    tensors = load_file(dest / "adapter_model.safetensors")
    tensors["base_model.model.model.norm.weight"] = torch.full((112,), 1.5)
    save_file(tensors, dest / "adapter_model.safetensors")
    with pytest.raises(LoraError, match=r"saved base parameters that replace the model's \(model\.norm\.weight\)"):
        check_unmerged(our_model(tiny("qwen2.5")), LoraAdapter.from_dir(dest))


def test_adapters_that_do_not_fit_are_refused_as_by_merge(tiny, row_adapters):
    model = our_model(tiny("qwen2.5"))
    other = LoraAdapter.from_dir(row_adapters("lora_bias"))  # made for the qwen1.5 tiny
    with pytest.raises(LoraError, match="architecture differs: hidden_size 64 there, 112 here"):
        RowAdapters(model, [other])
    with pytest.raises(LoraError, match=r"row 1 has a str; each row takes a LoraAdapter or None"):
        RowAdapters(model, [None, "qkvo"])


def test_a_forward_of_another_batch_size_is_refused(mixed):
    model, adapters, _ = mixed
    with torch.no_grad(), pytest.raises(LoraError, match="a forward of 2 rows, but adapters were given for 3"):
        model(IDS[:2], lora=RowAdapters(model, adapters))


# ----------------------------------------------------------------------------------------------------------
# preparation: once per (adapter, model)


def test_branches_are_prepared_once_and_follow_the_model(tiny, row_adapters, monkeypatch):
    model = our_model(tiny("qwen2.5"))
    plain, dora = LoraAdapter.from_dir(row_adapters("qkvo")), LoraAdapter.from_dir(row_adapters("dora"))
    prepared = []
    real = rows._prepare
    monkeypatch.setattr(rows, "_prepare", lambda m, a: prepared.append(a.name) or real(m, a))
    check_unmerged(model, plain)
    first = RowAdapters(model, [plain, dora])
    check_unmerged(model, dora)
    assert RowAdapters(model, [dora, None, plain])._groups[1][0] is first._groups[0][0]  # reused, not recomputed
    assert prepared == ["qkvo", "dora"]
    q = model.model.layers[0].self_attn.q_proj
    factor = RowAdapters(model, [dora])._groups[0][0][q].dora[0]

    with torch.no_grad():
        q.weight.add_(0.01)  # the DoRA norms depend on W: recomputed when it changes
    assert not torch.equal(RowAdapters(model, [dora])._groups[0][0][q].dora[0], factor)

    model.double()  # a cast model gets branches in its new dtype
    assert RowAdapters(model, [plain])._groups[0][0][q].A.dtype == torch.float64
    with torch.no_grad():
        assert model(TOKENS, lora=RowAdapters(model, [plain, plain])).dtype == torch.float64


def test_no_rows_adapters_on_a_merged_model(tiny, row_adapters):
    model = our_model(tiny("qwen2.5"))
    plain, dora = LoraAdapter.from_dir(row_adapters("qkvo")), LoraAdapter.from_dir(row_adapters("dora"))
    merge(model, plain)
    with pytest.raises(LoraError, match=r"adapter 'qkvo' is merged into the model's weights.*unmerge\(\) it first"):
        RowAdapters(model, [None, dora])
    RowAdapters(model, [None, None])  # rows without adapters read the weights as they are
    unmerge(model)
    RowAdapters(model, [None, dora])


def test_first_use_under_inference_mode_then_autograd(tiny, row_adapters):
    model = our_model(tiny("qwen2.5"))
    adapter = LoraAdapter.from_dir(row_adapters("qkvo"))
    with torch.inference_mode():
        RowAdapters(model, [adapter])
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)  # later layers' LoRA inputs need grads
    model(TOKENS[:1], lora=RowAdapters(model, [adapter])).sum().backward()  # no inference tensors were kept


def test_a_dropped_adapter_leaves_the_cache(tiny, row_adapters):
    model = our_model(tiny("qwen2.5"))
    adapter = LoraAdapter.from_dir(row_adapters("qkvo"))
    RowAdapters(model, [adapter])
    assert len(rows._PREPARED[model]) == 1
    del adapter
    gc.collect()
    assert len(rows._PREPARED[model]) == 0
