"""torch_ops.prefill_attention and sdpa_prefill, the default backend's prefill attention, against attention() and
float64.

Tolerance: the error against float64 may be at most 1.5x attention()'s own (the eager path, HF's arithmetic) plus
4 units of rounding at the output scale. Both compute the same sums: torch's flash kernel (sdpa_prefill, float32
prefill_attention) sums them in other orders, in bfloat16 with float32 scores and bfloat16 probabilities; the
bfloat16 blocks are attention()'s own arithmetic over shorter softmax rows (the masked keys they leave out
contribute exact zeros). A wrong mask, a wrong key range or a misread GQA head would be errors of the order of the
outputs themselves.
"""

from __future__ import annotations

import pytest
import torch

from qwen_ref.models import torch_ops
from qwen_ref.models.torch_ops import attention, prefill_attention, sdpa_prefill


def _qkv(B, H, KV, T, S, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g).to(dtype).transpose(1, 2)  # [B, H, T, D], strided as the model's
    k = torch.randn(B, KV, S + 7, D, generator=g).to(dtype)[:, :, :S]  # a cache's view with room left
    v = torch.randn(B, KV, S + 7, D, generator=g).to(dtype)[:, :, :S]
    return q, k, v


def _error(out, ref):
    return (out.double() - ref).abs().max().item()


# (H, KV, T, S, D): whole prompts (T == S) and chunks after the first (T < S), GQA and MHA, blocks of queries
# that end inside a block (T not a multiple of 64), one query
SHAPES = [(14, 2, 300, 300, 64), (16, 16, 200, 200, 64), (40, 8, 130, 130, 128), (14, 2, 96, 700, 64),
          (7, 7, 70, 500, 80), (14, 2, 1, 9, 64), (14, 2, 32, 32, 64)]


@pytest.mark.parametrize(("H", "KV", "T", "S", "D"), SHAPES)
@pytest.mark.parametrize(("dtype", "op"), [(torch.float32, "prefill_attention"), (torch.bfloat16, "prefill_attention"),
                                           (torch.bfloat16, "sdpa_prefill")])
def test_error_is_that_of_the_eager_path(H, KV, T, S, D, dtype, op):
    q, k, v = _qkv(1, H, KV, T, S, D, dtype, seed=T + S)
    scale = D**-0.5
    ref = attention(q.double(), k.double(), v.double(), None, None, scale)
    run = prefill_attention if op == "prefill_attention" else lambda *a: sdpa_prefill(*a[:3], a[-1])
    ours = _error(run(q, k, v, None, None, scale), ref)
    eager = _error(attention(q, k, v, None, None, scale), ref)
    unit = 2.0**-24 if dtype == torch.float32 else 2.0**-8
    assert ours <= 1.5 * eager + 4 * unit * ref.abs().max().item(), (ours, eager)


@pytest.mark.parametrize("cap", [None, 14 * 300 * 4 * 5])  # 5 queries' float32 scores: attention() splits blocks
@pytest.mark.parametrize(("H", "KV", "T", "S", "D"), SHAPES)
def test_bfloat16_blocks_are_attention_itself_on_each_block(H, KV, T, S, D, cap, monkeypatch):
    # the documented bfloat16 arithmetic, bit for bit: block [t, t + r) of the queries is attention() over the
    # first S - T + t + r keys, and a block whose scores would pass SCORE_BLOCK_BYTES is split, so the cap holds
    if cap is not None:
        monkeypatch.setattr(torch_ops, "SCORE_BLOCK_BYTES", cap)
        whole = torch_ops._attend

        def capped(q, k, v, q_pos, window, scale):  # every piece attended at once keeps its scores under the cap
            assert q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * 4 <= cap
            return whole(q, k, v, q_pos, window, scale)

        monkeypatch.setattr(torch_ops, "_attend", capped)
    q, k, v = _qkv(1, H, KV, T, S, D, torch.bfloat16, seed=T * S)
    scale = D**-0.5
    n = torch_ops.PREFILL_QUERY_BLOCK
    want = torch.cat([attention(q[:, :, t : t + n], k[:, :, : S - T + min(T, t + n)], v[:, :, : S - T + min(T, t + n)],
                                None, None, scale) for t in range(0, T, n)], dim=2)
    assert torch.equal(prefill_attention(q, k, v, None, None, scale), want)


@pytest.mark.parametrize(("H", "KV", "T", "S", "D"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_corner_mask_gives_the_whole_masks_bits(H, KV, T, S, D, dtype):
    # attention() without positions masks only the T x T corner, in place; with the positions spelled out it
    # builds and applies the whole causal mask: the same scores, so the same bits
    q, k, v = _qkv(2, H, KV, T, S, D, dtype, seed=T + 3 * S)
    q_pos = (S - T + torch.arange(T)).expand(2, T)
    assert torch.equal(attention(q, k, v, None, None, D**-0.5), attention(q, k, v, q_pos, None, D**-0.5))


def test_query_blocks_of_a_long_chunk(monkeypatch):
    # float32: a chunk whose masks would pass SCORE_BLOCK_BYTES goes in blocks of queries, each over the keys its
    # last query sees; the blocks together are the same attention
    q, k, v = _qkv(1, 14, 2, 100, 400, 64, torch.float32, seed=3)
    ref = attention(q.double(), k.double(), v.double(), None, None, 0.125)
    whole = prefill_attention(q, k, v, None, None, 0.125)
    monkeypatch.setattr(torch_ops, "SCORE_BLOCK_BYTES", 400 * 7)  # 7 queries a block, the last block 2
    blocked = prefill_attention(q, k, v, None, None, 0.125)
    assert _error(whole, ref) < 2e-6 and _error(blocked, ref) < 2e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_row_equals_the_row_alone(dtype):
    q, k, v = _qkv(3, 14, 2, 150, 150, 64, dtype, seed=5)
    together = prefill_attention(q, k, v, None, None, 0.125)
    for b in range(3):
        assert torch.equal(together[b : b + 1], prefill_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], None, None,
                                                               0.125))


@pytest.mark.parametrize("case", ["positions", "window", "float64"])
def test_what_it_does_not_cover_is_attention_itself(case):
    dtype = torch.float64 if case == "float64" else torch.float32
    q, k, v = _qkv(2, 14, 2, 32, 96, 64, dtype, seed=7)
    q_pos = (64 + torch.arange(32)).expand(2, 32) if case == "positions" else None
    window = 40 if case == "window" else None
    assert torch.equal(prefill_attention(q, k, v, q_pos, window, 0.125), attention(q, k, v, q_pos, window, 0.125))


def test_the_default_backend_prefills_with_it(tiny):
    import qwen_ref

    default = qwen_ref.load(tiny("qwen2.5"), dtype="float32").model
    if default.backends.name != "invariant":
        pytest.skip(f"the default backend here is {default.backends.name}")
    exact = qwen_ref.load(tiny("qwen2.5"), dtype="float32", decode_linear="torch").model
    from qwen_ref.models.backends import _invariant_prefill_attention

    # float32 prompts: prefill_attention itself (bfloat16 ones: the C++ flash attention, test_flash_prefill.py)
    assert default.backends.attention is _invariant_prefill_attention and exact.backends.attention is attention
    ids = torch.randint(0, 1000, (1, 60), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a = default(ids, cache=default.new_cache(1, 60))
        b = exact(ids, cache=exact.new_cache(1, 60))
    # float32 rounding through the tiny model's layers, at the logits' scale
    assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()


@pytest.mark.parametrize("amx", [True, False])
def test_bfloat16_prefill_on_cpus_with_amx_is_torchs(tiny, monkeypatch, amx):
    # where torch_bf16_prefill() (a CPU with AMX), a bfloat16 prompt's linears are BLAS's at any length and its
    # attention is sdpa_prefill; decode steps keep the kernel. Elsewhere a chunk of up to BF16_KERNEL_ROWS tokens
    # runs the kernel. Either way the logits are the torch backend's up to bfloat16 rounding.
    import qwen_ref
    from qwen_ref.models import backends

    model = qwen_ref.load(tiny("qwen2.5"), dtype="bfloat16").model
    if model.backends.name != "invariant":
        pytest.skip(f"the default backend here is {model.backends.name}")
    monkeypatch.setattr(backends, "torch_bf16_prefill", lambda: amx)
    blas, sdpa, kernel = [], [], []
    torch_linear, unchecked = torch_ops.linear, backends.linears_unchecked
    monkeypatch.setattr(torch_ops, "linear", lambda x, layers: blas.append(x.shape[:2]) or torch_linear(x, layers))
    monkeypatch.setattr(torch_ops, "sdpa_prefill", lambda *a: sdpa.append(a[0].shape) or sdpa_prefill(*a))
    monkeypatch.setattr(backends, "linears_unchecked", lambda x, *a: kernel.append(len(x)) or unchecked(x, *a))
    ids = torch.randint(0, 1000, (1, 21), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        cache = model.new_cache(1, 21)
        prompt = model(ids[:, :20], cache=cache)
        model(ids[:, 20:], cache=cache)  # a decode step
    layers = model.config.num_hidden_layers
    prompt_calls = 4 * layers + 1  # per layer q/k/v, o_proj, gate/up, down_proj; then the lm_head
    assert sdpa == ([(1, model.config.num_attention_heads, 20, model.config.head_dim)] * layers if amx else [])
    assert blas == ([(1, 20)] * prompt_calls if amx else [])
    # the decode step's layers run decode_layer, one C++ call each; its lm_head is the kernel's
    assert kernel == ([1] if amx else [20] * prompt_calls + [1])
    reference = qwen_ref.load(tiny("qwen2.5"), dtype="bfloat16", decode_linear="torch").model
    with torch.inference_mode():
        want = reference(ids[:, :20], cache=reference.new_cache(1, 20))
    # bfloat16 rounding through the tiny model's layers, at the logits' scale: 0.011 (torch's route) and 0.002 (the
    # kernels') measured, about 3 and 1 bfloat16 units
    assert (prompt.float() - want.float()).abs().max().item() <= 0.03 * want.float().abs().max().item()
