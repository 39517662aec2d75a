"""Tensor parallelism on the CPU with gloo: 2 and 4 ranks against one, on the tiny presets (the coder-32B head
layout among them), full forwards and through the KV cache; the splits a model cannot take, and a rank that
fails, as clear errors."""

from __future__ import annotations

import time

import pytest
import torch

import qwen_ref
from qwen_ref.config import QwenConfig
from qwen_ref.parallel.check import cached_logits, rank_logits
from qwen_ref.parallel.launch import spawn
from qwen_ref.parallel.tp import TensorParallelError, local_config

IDS = list(range(1000, 1040))
# TP adds a row-parallel product's partial sums in another order than one BLAS call: equal to rounding only
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}  # of the largest |logit|


@pytest.mark.parametrize(("preset", "world"), [("qwen2.5", 2), ("qwen2.5-coder-32b-shape", 2), ("qwen1.5", 4),
                                               ("yarn", 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tensor_parallel_logits_equal_one_rank(tiny, tmp_path, preset, world, dtype):
    out = tmp_path / "logits.pt"
    spawn(rank_logits, world, str(tiny(preset)), dtype, IDS, str(out), timeout_s=60)
    got = torch.load(out)
    one = qwen_ref.load(tiny(preset), dtype=str(dtype).removeprefix("torch."), decode_linear="torch")
    x = torch.tensor([IDS])
    with torch.inference_mode():
        expected = {"full": one.model(x), "cached": cached_logits(one.model, x, dtype)}
    for kind in ("full", "cached"):
        scale = expected[kind].abs().max().item()
        assert (got[kind] - expected[kind]).abs().max().item() <= TOLERANCE[dtype] * scale, kind
        assert torch.equal(got[kind].argmax(-1), expected[kind].argmax(-1)), kind  # greedy: the same tokens


@pytest.mark.parametrize(("preset", "world", "dtype"), [
    ("qwen2.5", 2, torch.float32), ("qwen2.5-coder-32b-shape", 2, torch.float32), ("yarn", 2, torch.float32),
    ("qwen2.5-coder-32b-shape", 2, torch.bfloat16), ("qwen1.5", 4, torch.float64),
])
def test_exact_order_is_one_rank_bit_for_bit(tiny, tmp_path, preset, world, dtype):
    # exact=True: each layer runs with its weights gathered whole, so every op has the one-rank shapes. One rank
    # runs with the ranks' one thread: a BLAS's bits may depend on its thread count (MKL's float32 product of 40
    # rows by 1,280 -> 64 columns, the coder preset's o_proj, splits its sums over 2 threads on an Intel Xeon)
    out = tmp_path / "logits.pt"
    spawn(rank_logits, world, str(tiny(preset)), dtype, IDS, str(out), True, timeout_s=60)
    got = torch.load(out)
    one = qwen_ref.load(tiny(preset), dtype=str(dtype).removeprefix("torch."), decode_linear="torch")
    x = torch.tensor([IDS])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            assert torch.equal(got["full"], one.model(x))
            assert torch.equal(got["cached"], cached_logits(one.model, x, dtype))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(("preset", "world", "needle"), [
    ("qwen2.5-coder-32b-shape", 4, "num_key_value_heads = 2"),
    ("qwen2.5", 3, "num_key_value_heads = 2, num_attention_heads = 14"),
    ("qwen2.5", 0, "0 ranks; an integer >= 1"),
])
def test_splits_that_do_not_divide_are_named(tiny, preset, world, needle):
    config = QwenConfig.from_file(tiny(preset) / "config.json")
    with pytest.raises(TensorParallelError, match=needle):
        local_config(config, world)


def _fail_on_rank_1(rank: int, world: int) -> None:
    if rank == 1:
        raise RuntimeError("rank 1 failed")
    x = torch.ones(2)
    torch.distributed.all_reduce(x)  # rank 0 waits for a rank that is gone: the timeout ends it


def test_a_failing_rank_is_an_error_not_a_hang():
    started = time.monotonic()
    with pytest.raises(TensorParallelError, match=r"tensor-parallel run failed: RuntimeError: rank [01] of 2"):
        spawn(_fail_on_rank_1, 2, timeout_s=10)
    assert time.monotonic() - started < 60
