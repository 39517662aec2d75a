"""Models loaded with decode_linear="invariant": decode steps through the batch-invariant CPU linear.

Tolerances. float32: 1e-4 max |logit difference| against transformers, as for the default path; the kernel sums
in another order than BLAS, so the difference is not 0 but float32 rounding (measured: about 1e-6). bfloat16:
the two sides round their linear outputs to bfloat16 from differently ordered float32 sums, so they are not
bit-equal; the bound is that our error against float64 is at most 2x transformers' bfloat16 error against the
same float64 logits (plus 0.05 at a logit scale of about 16); float16 likewise, against transformers in float16.
Exactness of batching: bit-equal to running alone, tested through the engine and through generate().
"""

from __future__ import annotations

import pytest
import torch
from conftest import hf_model
from transformers import GenerationConfig

import qwen_ref
from qwen_ref.engine import generate_ids
from qwen_ref.errors import CheckpointError
from qwen_ref.models.kv_cache import KVCache
from qwen_ref.qwen import load

PRESETS = ["qwen2.5", "qwen1.5", "sliding", "dynamic", "yarn"]


def _step_logits(model, prompt: list[int], feed: list[int], dtype) -> torch.Tensor:
    """Logits [len(feed) + 1, V]: after the prompt, then after each fed token, one token per decode step."""
    cache = KVCache(model.config, 1, len(prompt) + len(feed) + 1, dtype=dtype)
    with torch.inference_mode():
        out = [model(torch.tensor([prompt]), cache=cache, last_only=True)[0, 0]]
        for t in feed:
            out.append(model(torch.tensor([[t]]), cache=cache)[0, 0])
    return torch.stack(out)


def _hf_logits(hf, prompt, feed) -> torch.Tensor:
    ids = torch.tensor([prompt + feed])
    with torch.no_grad():
        return hf(ids).logits[0, len(prompt) - 1 :].double()


@pytest.mark.parametrize("preset", PRESETS)
def test_decode_steps_match_transformers_fp32(tiny, preset):
    path = tiny(preset)
    ours = load(path, decode_linear="invariant").model
    assert ours.backends.batch_invariant and ours.backends.name == "invariant"
    # 44 positions: within the dynamic preset's 48, where one full forward and stepwise decoding use the same rope
    prompt, feed = list(range(3, 40)), [5, 99, 1000, 7, 7, 42, 64]
    a = _step_logits(ours, prompt, feed, torch.float32).double()
    b = _hf_logits(hf_model(path), prompt, feed)
    assert (a - b).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("preset", ["qwen2.5", "qwen1.5", "qwen2.5-coder-32b-shape"])  # coder: head size 128
def test_decode_steps_half_width_within_twice_transformers_error(tiny, preset, dtype):
    path = tiny(preset)
    prompt, feed = list(range(10, 30)), [3, 17, 256, 9, 1024]
    truth = _step_logits(load(path, dtype="float64").model, prompt, feed, torch.float64)
    ours = _step_logits(load(path, dtype=str(dtype)[6:], decode_linear="invariant").model, prompt, feed, dtype)
    theirs = _hf_logits(hf_model(path, dtype), prompt, feed)
    ours_err = (ours.double() - truth).abs().max().item()
    their_err = (theirs - truth).abs().max().item()
    assert ours_err <= 2 * their_err + 0.05, (ours_err, their_err)


def _first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


@pytest.mark.parametrize("preset", ["qwen2.5", "qwen1.5", "sliding"])
def test_greedy_tokens_equal_the_torch_path_and_transformers(tiny, preset):
    """Same greedy tokens, or a first difference only at a near-tie: a step whose two best float64 logits are
    within the float32 tolerance (1e-4) of each other, where float rounding decides and either token is right.
    Random-weight models have such near-ties; a wrong fast path diverges at a clear margin instead."""
    path = tiny(preset)
    prompts = [[11, 22, 33, 44, 55, 66, 77], [5, 6, 7], list(range(100, 130))]
    fast = generate_ids(load(path, decode_linear="invariant").model, prompts, 40)
    plain = generate_ids(load(path).model, prompts, 40)
    hf = hf_model(path)
    hf.generation_config = GenerationConfig(do_sample=False, pad_token_id=0)  # not the checkpoint's sampling
    truth = load(path, dtype="float64").model
    exact_rows = 0
    for prompt, ours, base in zip(prompts, fast, plain):
        with torch.no_grad():
            theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=40, min_new_tokens=40)[0, len(prompt) :]
        assert base == theirs.tolist()  # the torch path is bit-equal to transformers
        i = _first_difference(ours, base)
        if i is None:
            exact_rows += 1
            continue
        with torch.no_grad():
            logits = truth(torch.tensor([prompt + base[:i]]))[0, -1]
        margin = (logits[base[i]] - logits[ours[i]]).abs().item()
        assert margin <= 1e-4, (preset, i, margin)
    assert exact_rows >= 2, f"{preset}: {3 - exact_rows} of 3 rows differ (each only at a near-tie)"


@pytest.mark.parametrize(("preset", "dtype"), [("qwen2.5", "float32"), ("qwen2.5", "bfloat16"), ("qwen2.5", "float16"),
                                              ("qwen2.5-coder-32b-shape", "bfloat16")])  # head size 128: C++ prefill
def test_exact_batch_is_one_forward_per_step_and_equals_each_row_alone(tiny, preset, dtype):
    model = load(tiny(preset), dtype=dtype, decode_linear="invariant").model
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9], [10] * 12, [3, 1, 4, 1, 5, 9, 2, 6], [7, 8, 9]]
    budgets = [20, 5, 17, 20, 1]
    alone = [generate_ids(model, [p], b, stop_ids=[11, 500])[0] for p, b in zip(prompts, budgets)]
    calls = []
    # every pass (a whole forward, or a prefill chunk run a few layers at a time) starts at the embedding
    hook = model.model.embed_tokens.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape))
    try:
        batched = generate_ids(model, prompts, budgets, stop_ids=[11, 500])
    finally:
        hook.remove()
    assert batched == alone
    decode_calls = [s for s in calls if s[1] == 1]
    # batched, not one forward per row: one decode forward per step over the rows still running
    lengths = [len(a) for a in alone]
    assert [s[0] for s in decode_calls] == [sum(n > step for n in lengths) for step in range(1, max(lengths))]
    # each distinct prompt prefilled alone (the two rows with the same prompt share its prefill)
    assert len(calls) - len(decode_calls) == len({tuple(p) for p in prompts})


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_n_seeded_samples_equal_each_sample_alone(tiny, dtype):
    qwen = qwen_ref.load(tiny("qwen2.5"), dtype=dtype, decode_linear="invariant")
    body = {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 1.0, "top_p": 0.9,
            "repetition_penalty": 1.2, "seed": 7}
    many = qwen_ref.generate(qwen, body, n=8)
    alone = [qwen_ref.generate(qwen, dict(body, seed=7 + i))["response"] for i in range(8)]
    assert [m["response"] for m in many] == alone
    assert len(set(alone)) > 1  # different seeds, different samples


def test_a_batch_of_different_requests_equals_each_alone(tiny):
    qwen = qwen_ref.load(tiny("qwen1.5"), decode_linear="invariant")
    bodies = [{"prompt": "a" * (i + 1), "max_tokens": 6 + 3 * i, "temperature": 0.7, "seed": 100 + i}
              for i in range(5)]
    together = qwen_ref.generate(qwen, bodies)
    assert [t["response"] for t in together] == [qwen_ref.generate(qwen, b)["response"] for b in bodies]


def test_sixteen_requests_in_one_forward_equal_each_alone(tiny):
    # qwen1.5's tiny MLP is 176 wide: torch's silu over [16, 1, 176] computed some elements of a row with scalar
    # exp and others with vectorized exp, differently from the row alone (rows 9 and 15 drew other tokens)
    qwen = qwen_ref.load(tiny("qwen1.5"))
    bodies = [{"messages": [{"role": "user", "content": f"Question number {i}?"}], "max_tokens": 24,
               "seed": 100 + i, "temperature": 1.0} for i in range(16)]
    assert qwen_ref.generate(qwen, bodies) == [qwen_ref.generate(qwen, b) for b in bodies]


@pytest.mark.parametrize("width", [176, 100, 4864, 27, 40000])  # 40,000: past torch's grain size
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_rowwise_activation_gives_each_row_its_bits_alone(width, dtype):
    from qwen_ref.models.torch_ops import silu_mul, silu_mul_rowwise
    from qwen_ref_kernels.invariant_linear import extension

    g = torch.Generator().manual_seed(width)
    gate, up = (torch.randn(33, 1, width, generator=g).mul(4).to(dtype) for _ in range(2))
    gate[3, 0, :9] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 88.7, -88.7, 1e-30, -104])
    for rows in (1, 2, 7, 16, 33):
        batch = silu_mul_rowwise(gate[:rows], up[:rows])
        in_one_call = extension().silu_mul_rows(gate[:rows], up[:rows])  # the invariant backend's
        for i in range(rows):
            alone = _bits(silu_mul(gate[i : i + 1], up[i : i + 1]))
            assert torch.equal(_bits(batch[i : i + 1]), alone), (rows, i)
            assert torch.equal(_bits(in_one_call[i : i + 1]), alone), (rows, i)


def _bits(t: torch.Tensor) -> torch.Tensor:
    # the bits of every number (a zero's sign too); every NaN as one NaN (the vector and scalar paths of torch's
    # silu give NaNs of other signs and payloads, which mean the same)
    t = torch.where(t.isnan(), torch.tensor(float("nan"), dtype=t.dtype), t)
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def test_bad_decode_linear_options_are_refused(tiny):
    path = tiny("qwen2.5")
    with pytest.raises(CheckpointError,
                       match="decode_linear: 'fast' is not supported; allowed: 'auto', 'torch', 'invariant'"):
        load(path, decode_linear="fast")
    with pytest.raises(CheckpointError, match=r"float32, bfloat16 or float16; got device cpu, dtype torch\.float64"):
        load(path, dtype="float64", decode_linear="invariant")


@pytest.mark.parametrize(("options", "name"), [
    ({}, "invariant"), ({"dtype": "bfloat16"}, "invariant"), ({"dtype": "float16"}, "invariant"),
    ({"decode_linear": "torch"}, "torch"), ({"dtype": "float64"}, "torch"), ({"offload": "disk"}, "torch")])
def test_the_default_decode_linear_is_the_invariant_kernel_where_it_runs(tiny, options, name):
    qwen = load(tiny("qwen2.5"), **options)
    assert qwen.model.backends.name == name
    assert qwen.model.backends.batch_invariant == (name == "invariant")


def test_auto_falls_back_to_torch_when_the_kernel_cannot_be_built(tiny, monkeypatch, caplog):
    from qwen_ref.models import backends
    from qwen_ref_kernels.invariant_linear import InvariantLinearUnavailable

    def no_compiler():
        raise InvariantLinearUnavailable("the batch-invariant CPU linear could not be built (no c++)")

    monkeypatch.setattr(backends, "extension", no_compiler)
    with caplog.at_level("WARNING", logger="qwen_ref"):
        qwen = load(tiny("qwen2.5"))
    assert qwen.model.backends.name == "torch"
    assert "decode_linear='auto' uses torch's linears" in caplog.text and "no c++" in caplog.text
    with pytest.raises(CheckpointError, match=r"decode_linear='invariant': .*no c\+\+"):
        load(tiny("qwen2.5"), decode_linear="invariant")  # asked for by name: an error, not a fallback


def test_server_exact_batching_decodes_the_requests_in_one_forward(tiny):
    import asyncio

    from qwen_ref.engine import Engine
    from qwen_ref.server.bridge import Served, collect, start
    from qwen_ref.server.settings import Settings

    qwen = qwen_ref.load(tiny("qwen1.5"), decode_linear="invariant")
    bodies = [{"prompt": f"request {i}" * (i + 1), "max_tokens": 8 + i, "seed": i + 1, "temperature": 0.9}
              for i in range(4)]
    alone = [qwen_ref.generate(qwen, b) for b in bodies]
    served = Served("m", qwen, Engine(qwen.model, max_running=4))
    rows = []
    hook = qwen.model.register_forward_pre_hook(lambda m, args: rows.append(tuple(args[0].shape)))
    served.engine.start()

    async def one(body):
        return (await collect(await start(served, body, Settings(timeout_s=60)))).result()

    async def run_all():
        return await asyncio.gather(*(one(b) for b in bodies))

    try:
        outputs = asyncio.run(run_all())
    finally:
        served.engine.close()
        hook.remove()
    assert outputs == alone
    assert max(b for b, t in rows if t == 1) > 1  # decode steps ran several requests in one forward


@pytest.mark.parametrize("preset", ["qwen2.5", "qwen1.5"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_the_one_call_decoder_layer_is_the_layer_op_by_op(tiny, preset, dtype):
    # Backends.decode_layer runs a decode step's layer in one C++ call; the same model without it runs the layer's
    # ops one by one. Logits and every cache entry must be bit-equal: one row alone, and rows of their own lengths
    import dataclasses

    from qwen_ref.models.kv_cache import RowCaches

    model = load(tiny(preset), dtype=dtype).model
    assert model.backends.decode_layer is not None
    op_by_op = dataclasses.replace(model.backends, decode_layer=None)
    prompts = [list(range(3, 40)), [11, 12], list(range(200, 217))]

    def run(backends) -> tuple[list[torch.Tensor], list[KVCache]]:
        model.backends = backends
        caches = [model.new_cache(1, 48) for _ in prompts]
        with torch.inference_mode():
            for prompt, cache in zip(prompts, caches):
                model(torch.tensor([prompt]), cache=cache, last_only=True)
            out = [model(torch.tensor([[5]]), cache=caches[0])[0, 0]]  # one row, its own KVCache
            for token in (9, 1000, 7):  # three rows of three lengths, one forward
                rows = RowCaches(caches, backends.write_rows)
                out.append(model(torch.tensor([[token]] * 3), cache=rows)[:, 0])
        return out, caches

    ran = []  # per decode_layer call: did the one call run (prefill chunks keep the ops)

    def counted(layer, x, fwd):
        out = backends.decode_layer(layer, x, fwd)
        ran.append(out is not None)
        return out

    backends = model.backends
    fused, fused_caches = run(dataclasses.replace(backends, decode_layer=counted))
    assert sum(ran) == 4 * model.config.num_hidden_layers  # every layer of the 4 decode steps
    alone, alone_caches = run(op_by_op)
    for a, b in zip(fused, alone):
        assert torch.equal(a, b)
    for a, b in zip(fused_caches, alone_caches):
        assert all(torch.equal(x, y) for x, y in zip(a.k + a.v, b.k + b.v))


def test_float32_and_float16_prefill_linears_run_the_kernel_in_blocks_of_rows(tiny, monkeypatch):
    # a float32 or float16 prompt longer than one call's rows: the kernel in blocks of KERNEL_PREFILL_ROWS, each row
    # the bits of that row alone; bfloat16 prefill longer than BF16_KERNEL_ROWS keeps BLAS (F.linear's bits), and
    # so does all of it on a CPU with AMX (test_prefill_attention.py)
    from qwen_ref.models import backends
    from qwen_ref.models.backends import BF16_KERNEL_ROWS, KERNEL_PREFILL_ROWS
    from qwen_ref_kernels.invariant_linear import invariant_linear

    monkeypatch.setattr(backends, "torch_bf16_prefill", lambda: False)

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        model = load(tiny("qwen2.5"), dtype=str(dtype)[6:]).model
        attn = model.model.layers[0].self_attn
        layers = [attn.q_proj, attn.k_proj, attn.v_proj]
        x = torch.randn(2, KERNEL_PREFILL_ROWS + 11, model.config.hidden_size).to(dtype)  # 150 rows in 3 calls
        ys = model.backends.linear(x, layers)
        for y, m in zip(ys, layers, strict=True):
            assert y.shape == (*x.shape[:2], m.weight.shape[0])
            if dtype != torch.bfloat16:
                for b, t in [(0, 0), (0, 63), (0, 64), (1, 10), (1, 74)]:
                    assert torch.equal(y[b, t], invariant_linear(x[b, t][None], m.weight, m.bias)[0]), (b, t)
                blas = torch.nn.functional.linear(x.float(), m.weight.float(), m.bias.float())  # float32 sums
                atol = 1e-5 if dtype == torch.float32 else 2.0**-11 * blas.abs().max().item()  # + float16 rounding
                torch.testing.assert_close(y.float(), blas, rtol=0, atol=atol)
            else:
                assert torch.equal(y, torch.nn.functional.linear(x, m.weight, m.bias))
                short = x[:1, :BF16_KERNEL_ROWS]  # the engine's chunk: the kernel's rows
                assert torch.equal(model.backends.linear(short, [m])[0][0, 5], invariant_linear(short[0, 5][None],
                                                                                                m.weight, m.bias)[0])
