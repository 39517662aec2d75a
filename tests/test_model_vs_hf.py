"""Our model against transformers' Qwen2ForCausalLM (eager attention) on the same checkpoints.

Tolerances. float32: 1e-4 max |logit difference| (DESIGN.md). With decode_linear="torch" both sides run the
same float32 operations in the same order (measured: 0.0 on this machine); load()'s default (the invariant
kernel for short inputs, causal attention without the masked half) sums in other orders, float32 rounding well
inside 1e-4. bfloat16, with decode_linear="torch": the same operations in the same order give the same
roundings, so the tolerance is 1e-2 (a tenth of a bf16 ulp at the logit scale of ~16) and greedy tokens must
agree; the default stays within 2 bf16 units at the logits' scale. float64: 1e-10 against transformers with its
three float32 steps (RMSNorm, attention softmax, rotary cos/sin) lifted to float64 as ours are; against stock
transformers float64 the difference is bounded by those float32 steps (~1e-5).
"""

from __future__ import annotations

import pytest
import torch
from conftest import TEST_PRESETS, hf_model

from qwen_ref.engine import generate_ids
from qwen_ref.models.kv_cache import KVCache
from qwen_ref.qwen import load

FP32_TOL = 1e-4


def random_ids(batch: int, length: int, seed: int, vocab: int = 151643) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset", TEST_PRESETS)
def test_full_forward_matches_transformers_fp32(tiny, preset):
    path = tiny(preset)
    ours, theirs = load(path).model, hf_model(path)
    # lengths increase so transformers' stateful dynamic-NTK cache sees the same sequence of lengths as a
    # fresh model would; 64 crosses the dynamic preset's max_position_embeddings (48)
    for batch, length in [(1, 1), (1, 7), (3, 33), (2, 64)]:
        ids = random_ids(batch, length, seed=length)
        with torch.no_grad():
            a = ours(ids)
            b = theirs(ids).logits.float()
        assert a.shape == (batch, length, ours.config.vocab_size)
        assert a.dtype == torch.float32
        assert (a - b).abs().max().item() <= FP32_TOL, (preset, batch, length)


def _stepwise_through_cache(model, prompts, feed):
    """Prefill right-padded prompts of different lengths, then feed feed[b][i] one token per step."""
    batch = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts])
    ids = torch.zeros(batch, int(lengths.max()), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    cache = KVCache(model.config, batch, int(lengths.max()) + len(feed[0]) + 1, dtype=torch.float32)
    with torch.no_grad():
        full_prefill = model(ids, cache=cache, num_new=lengths)
        steps = [full_prefill[torch.arange(batch), lengths - 1]]
        for i in range(len(feed[0])):
            tokens = torch.tensor([f[i] for f in feed])[:, None]
            steps.append(model(tokens, cache=cache)[:, 0])
    return steps, cache


@pytest.mark.parametrize("preset", [p for p in TEST_PRESETS if p != "dynamic"])
def test_cached_decode_equals_full_forward(tiny, preset):
    model = load(tiny(preset)).model
    prompt_lengths = [5, 11, 17]
    prompts = [random_ids(1, n, seed=100 + n)[0].tolist() for n in prompt_lengths]
    feed = random_ids(3, 8, seed=7).tolist()
    steps, cache = _stepwise_through_cache(model, prompts, feed)
    assert cache.lengths.tolist() == [n + 8 for n in prompt_lengths]
    for row in range(3):
        seq = torch.tensor(prompts[row] + feed[row])[None]
        with torch.no_grad():
            full = model(seq)[0]
        for i, logits in enumerate(steps):
            pos = prompt_lengths[row] - 1 + i
            assert (logits[row] - full[pos]).abs().max().item() <= FP32_TOL, (preset, row, i)


@pytest.mark.parametrize("preset", TEST_PRESETS)
def test_cached_decode_matches_transformers_cache(tiny, preset):
    """Token by token through both caches: this is where dynamic NTK's per-length frequencies show up."""
    from transformers import DynamicCache

    path = tiny(preset)
    ours, theirs = load(path).model, hf_model(path)
    prompt = random_ids(1, 40, seed=3)
    feed = random_ids(1, 16, seed=4)
    cache = KVCache(ours.config, 1, 64, dtype=torch.float32)
    hf_cache = DynamicCache(config=theirs.config)
    with torch.no_grad():
        a = ours(prompt, cache=cache)[:, -1]
        b = theirs(prompt, past_key_values=hf_cache, use_cache=True).logits[:, -1]
        assert (a - b).abs().max().item() <= FP32_TOL
        for i in range(feed.shape[1]):
            tok = feed[:, i : i + 1]
            a = ours(tok, cache=cache)[:, -1]
            b = theirs(tok, past_key_values=hf_cache, use_cache=True).logits[:, -1]
            assert (a - b).abs().max().item() <= FP32_TOL, (preset, i)


@pytest.mark.parametrize("preset", TEST_PRESETS)
def test_greedy_64_tokens_equal_transformers_generate(tiny, preset):
    from transformers import GenerationConfig

    path = tiny(preset)
    ours, theirs = load(path).model, hf_model(path)
    theirs.generation_config = GenerationConfig(do_sample=False, pad_token_id=0)
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (9, 30)]
    ours_out = generate_ids(ours, prompts, 64)  # both rows in one batch, different prompt lengths
    for prompt, mine in zip(prompts, ours_out):
        with torch.no_grad():
            out = theirs.generate(torch.tensor([prompt]), max_new_tokens=64, min_new_tokens=64)
        assert mine == out[0, len(prompt) :].tolist()


def test_batch_rows_are_independent(tiny):
    """A row's logits do not depend on what else is in the batch or on its padding."""
    model = load(tiny("qwen2.5")).model
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (3, 12, 7)]
    feed = random_ids(3, 5, seed=1).tolist()
    together, _ = _stepwise_through_cache(model, prompts, feed)
    for row in range(3):
        alone, _ = _stepwise_through_cache(model, [prompts[row]], [feed[row]])
        for a, b in zip(together, alone):
            assert (a[row] - b[0]).abs().max().item() <= FP32_TOL


def test_bf16_matches_transformers_bf16(tiny):
    path = tiny("qwen2.5", "bfloat16")
    q = load(path, decode_linear="torch")
    assert q.dtype == torch.bfloat16  # from config.json's torch_dtype
    theirs = hf_model(path, torch.bfloat16)
    ids = random_ids(2, 24, seed=5)
    with torch.no_grad():
        a = q.model(ids)
        b = theirs(ids).logits.float()
        default = load(path).model(ids)
    unit = 2.0 ** (torch.frexp(b.abs().max()).exponent.item() - 8)  # a bf16 ulp at the largest logit
    assert (default - b).abs().max().item() <= 2 * unit
    assert a.dtype == torch.float32
    assert torch.isfinite(a).all()
    assert (a - b).abs().max().item() <= 1e-2
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    prompt = ids[0, :10].tolist()
    theirs.generation_config.update(do_sample=False, repetition_penalty=1.0, top_k=None, top_p=None,
                                    temperature=None, pad_token_id=0)
    with torch.no_grad():
        out = theirs.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16)
    assert generate_ids(q.model, [prompt], 16)[0] == out[0, 10:].tolist()


def _lift_transformers_float32_steps(monkeypatch):
    """Make transformers' float64 run float64 throughout: RMSNorm, softmax and rotary angles are float32 in it."""
    import transformers.models.qwen2.modeling_qwen2 as m

    def rms_forward(self, x):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h

    def rotary_forward(self, x, position_ids):
        freqs = position_ids[..., None].double() * self.inv_freq.to(device=x.device, dtype=torch.float32).double()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling

    original_attention = m.eager_attention_forward

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        k, v = m.repeat_kv(key, module.num_key_value_groups), m.repeat_kv(value, module.num_key_value_groups)
        w = torch.matmul(query, k.transpose(2, 3)) * scaling
        if attention_mask is not None:
            w = w + attention_mask
        w = torch.softmax(w, dim=-1)
        return torch.matmul(w, v).transpose(1, 2).contiguous(), w

    assert original_attention is not None
    monkeypatch.setattr(m.Qwen2RMSNorm, "forward", rms_forward)
    monkeypatch.setattr(m.Qwen2RotaryEmbedding, "forward", rotary_forward)
    monkeypatch.setattr(m, "eager_attention_forward", attention)


@pytest.mark.parametrize("preset", ["qwen1.5", "qwen2.5", "yarn"])
def test_fp64_matches_transformers_fp64(tiny, preset, monkeypatch):
    path = tiny(preset)
    q = load(path, dtype="float64")
    ids = random_ids(2, 20, seed=11)
    with torch.no_grad():
        a = q.model(ids)
        stock = hf_model(path, torch.float64)(ids).logits
    assert a.dtype == torch.float64
    # stock transformers float64 keeps float32 steps: the gap is their rounding, no more
    assert 0 < (a - stock).abs().max().item() <= 1e-4
    _lift_transformers_float32_steps(monkeypatch)
    with torch.no_grad():
        lifted = hf_model(path, torch.float64)(ids).logits
    assert (a - lifted).abs().max().item() <= 1e-10


def test_logits_without_cache_use_positions_from_zero(tiny):
    """model(ids) with no other argument is the plain causal forward: prefix logits do not see the future."""
    model = load(tiny("qwen2.5")).model
    ids = random_ids(1, 12, seed=2)
    with torch.no_grad():
        full = model(ids)
        prefix = model(ids[:, :5])
    assert (full[:, :5] - prefix).abs().max().item() <= FP32_TOL
