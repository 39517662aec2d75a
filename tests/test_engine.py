"""The engine: continuous batching, chunked prefill, growing KV memory, admission, isolation, cancellation."""

from __future__ import annotations

import json

import pytest
import torch

import qwen_ref
from qwen_ref.engine import Engine, Failed, Finished, Token, generate_ids
from qwen_ref.errors import ConfigError, InvalidInput, JsonModeNotMet, KVMemoryExceeded, NonFiniteLogits, QwenRefError
from qwen_ref.models.kv_cache import CacheFullError, KVCache, RowCaches, bytes_per_token
from qwen_ref.sampling.json_mask import JsonConstraintError
from qwen_ref.workers_ai.output import Response
from qwen_ref.workers_ai.request import prepare
from qwen_ref.workers_ai.validate import validate_output

SYSTEM = {"role": "system", "content": "You are a friendly assistant"}


@pytest.fixture(scope="module")
def qwen25(tiny):
    return qwen_ref.load(tiny("qwen2.5"))


@pytest.fixture(scope="module")
def qwen15(tiny):
    return qwen_ref.load(tiny("qwen1.5"))


def bodies(n: int, max_tokens: int = 24) -> list[dict]:
    return [{"messages": [SYSTEM, {"role": "user", "content": f"Question {i}"}], "max_tokens": max_tokens,
             "seed": 100 + i, "temperature": 1.0} for i in range(n)]


def run(qwen, prepared, engine: Engine) -> list[Response]:
    responses = [Response(qwen.tokenizer, p) for p in prepared]
    for p, r in zip(prepared, responses):
        engine.add(p.engine_request(qwen), r.push)
    while engine.has_work():
        engine.step()
    return responses


def without_padding(events: list[bytes]) -> list:
    """The events' data with the random `p` padding taken out (the bytes are otherwise the same)."""
    out = []
    for e in events:
        assert e.startswith(b"data: ") and e.endswith(b"\n\n")
        data = e[len(b"data: "):-2]
        obj = data if data == b"[DONE]" else json.loads(data)
        if isinstance(obj, dict):
            assert isinstance(obj.pop("p", ""), str)
        out.append(obj)
    return out


def stream_bytes(qwen, p, engine: Engine) -> list[bytes]:
    out: list[bytes] = []
    response = Response(qwen.tokenizer, p)
    engine.add(p.engine_request(qwen), lambda event: out.extend(response.stream_events(event)))
    while engine.has_work():
        engine.step()
    return out


# ------------------------------------------------------------------------------------------------- isolation


class Poison:
    """A forward hook that puts NaN in the logits of one request's rows, from its third forward on."""

    def __init__(self, model):
        self.handle = None
        self.calls = 0
        self.hook = model.register_forward_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs, out):
        cache = kwargs.get("cache")
        if out is None or self.handle is None or self.handle.cache is None:
            return out
        caches = cache.caches if isinstance(cache, RowCaches) else [cache]
        rows = [i for i, c in enumerate(caches) if c is self.handle.cache]
        if rows:
            self.calls += 1
            if self.calls >= 3:
                out[rows] = float("nan")
        return out


@pytest.mark.parametrize("mode", ["exact", "invariant", "fast"])
def test_one_failing_request_among_fifteen_leaves_the_others_as_alone(tiny, mode):
    """One request whose logits turn NaN and one whose grammar fails, among 14 others: each failing one gets
    its own typed error; the others give the bytes they give alone (exact modes), or complete (fast mode, where
    the batch's composition may change the rounding)."""
    exact = mode != "fast"
    qwen = qwen_ref.load(tiny("qwen1.5"), decode_linear="invariant" if mode == "invariant" else "torch")
    work = bodies(16, max_tokens=16)
    alone = [qwen_ref.generate(qwen, b, exact=exact) for b in work]
    prepared = [prepare(qwen, b) for b in work]
    poison = Poison(qwen.model)
    engine = Engine(qwen.model, exact=exact)
    responses = [Response(qwen.tokenizer, p) for p in prepared]
    handles = [engine.add(p.engine_request(qwen), r.push) for p, r in zip(prepared, responses)]
    poison.handle = handles[3]

    grammar = prepare(qwen, {"prompt": "json", "max_tokens": 20, "seed": 1, "response_format": {"type": "json_object"}})
    advance = grammar.constraint.advance
    steps = iter(range(100))

    def failing_advance(token: int) -> None:
        if next(steps) == 0:
            raise JsonConstraintError("llguidance failed to compute the mask: injected")
        advance(token)

    grammar.constraint.advance = failing_advance
    grammar_out = Response(qwen.tokenizer, grammar)
    engine.add(grammar.engine_request(qwen), grammar_out.push)
    try:
        while engine.has_work():
            engine.step()
    finally:
        poison.hook.remove()
    with pytest.raises(NonFiniteLogits):
        responses[3].result()
    with pytest.raises(JsonConstraintError, match="injected"):
        grammar_out.result()
    for i, r in enumerate(responses):
        if i != 3:
            result = r.result()
            validate_output(result)
            assert result == alone[i] or not exact, f"request {i} changed beside the failing ones"
    assert engine.stats()["failed"] == 2


def test_a_failing_stream_ends_with_its_error_event(qwen25):
    p = prepare(qwen25, {"prompt": "Hello", "max_tokens": 8, "seed": 1, "stream": True})
    poison = Poison(qwen25.model)
    engine = Engine(qwen25.model)
    out: list[bytes] = []
    response = Response(qwen25.tokenizer, p)
    poison.handle = engine.add(p.engine_request(qwen25), lambda e: out.extend(response.stream_events(e)))
    try:
        while engine.has_work():
            engine.step()
    finally:
        poison.hook.remove()
    assert out[-1] == b"data: [DONE]\n\n" and b'"error":"the model produced NaN' in out[-2]


def test_generate_raises_or_returns_each_failure(qwen25):
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    work = [{"prompt": "json", "max_tokens": 2, "seed": 1,
             "response_format": {"type": "json_schema", "json_schema": schema}},
            {"prompt": "plain", "max_tokens": 3, "seed": 2}]
    with pytest.raises(JsonModeNotMet):  # 2 tokens cannot complete {"name": "..."}
        qwen_ref.generate(qwen25, work)
    failed, ok = qwen_ref.generate(qwen25, work, return_exceptions=True)
    assert isinstance(failed, JsonModeNotMet) and ok == qwen_ref.generate(qwen25, work[1])


# ----------------------------------------------------------------------------------- scheduling and memory


def test_requests_join_and_leave_at_step_boundaries(qwen25):
    engine = Engine(qwen25.model, prefill_chunk=256)  # each prompt in one chunk: one step to its first token
    seen: list[tuple[int, str]] = []
    prepared = [prepare(qwen25, {"prompt": f"p{i}", "max_tokens": 3 + 3 * i, "seed": i + 1}) for i in range(3)]
    for i, p in enumerate(prepared[:2]):
        engine.add(p.engine_request(qwen25), lambda e, i=i: seen.append((i, type(e).__name__)))
    engine.step()
    engine.step()
    engine.add(prepared[2].engine_request(qwen25), lambda e: seen.append((2, type(e).__name__)))
    while engine.has_work():
        engine.step()
    assert seen[:4] == [(0, "Token"), (1, "Token"), (0, "Token"), (1, "Token")]
    assert seen.count((0, "Token")) == 3 and seen.count((1, "Token")) == 6 and seen.count((2, "Token")) == 9
    assert (0, "Finished") in seen and seen[-1] == (2, "Finished")
    assert engine.stats()["active"] == 0 and engine.stats()["kv_reserved_bytes"] == 0


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(qwen25):
    """No running request waits for more than one chunk of someone else's prompt between two of its tokens."""
    chunk = 64
    long = prepare(qwen25, {"prompt": "word " * 2000, "raw": True, "max_tokens": 2, "seed": 1})
    short = prepare(qwen25, {"prompt": "Hi", "max_tokens": 16, "seed": 2})
    assert len(long.prompt_ids) > 30 * chunk
    engine = Engine(qwen25.model, prefill_chunk=chunk)
    forwards: list[int] = []  # tokens per forward, in order
    # every pass (a whole forward, or a prefill chunk run a few layers at a time) starts at the embedding
    hook = qwen25.model.model.embed_tokens.register_forward_pre_hook(lambda m, args: forwards.append(args[0].shape[1]))
    steps: dict[str, list[int]] = {"long": [], "short": []}
    engine.add(long.engine_request(qwen25), lambda e: steps["long"].append(engine.counters["steps"]))
    engine.step()
    engine.add(short.engine_request(qwen25), lambda e: steps["short"].append(engine.counters["steps"]))
    try:
        while engine.has_work():
            engine.step()
    finally:
        hook.remove()
    assert max(forwards) == chunk  # the long prompt went in 64-token chunks
    first = steps["short"][0]
    # a token at every step, then Finished in the step of the last token
    assert steps["short"] == [*range(first, first + 16), first + 15]
    assert steps["long"][0] > steps["short"][-1]  # all while the long prompt was still being prefilled


def test_chunked_prefill_is_a_function_of_the_request_alone(qwen25):
    body = {"prompt": "word " * 300, "raw": True, "max_tokens": 6, "seed": 9, "temperature": 1.0}
    other = {"prompt": "another " * 100, "raw": True, "max_tokens": 6, "seed": 3}
    alone = qwen_ref.generate(qwen25, body, prefill_chunk=64)
    assert qwen_ref.generate(qwen25, [other, body, other], prefill_chunk=64)[1] == alone


def test_kv_memory_grows_with_use(qwen25):
    p = prepare(qwen25, {"prompt": "Hello", "max_tokens": 200, "temperature": 0, "seed": 1})
    engine = Engine(qwen25.model)
    handle = engine.add(p.engine_request(qwen25), lambda e: None)
    engine.step()
    assert handle.cache.capacity == 64 < len(p.prompt_ids) + 200  # not prompt + max_tokens up front
    for _ in range(60):
        engine.step()
    assert handle.cache.capacity in (128, len(p.prompt_ids) + 200)


def test_admission_queues_or_refuses_by_kv_memory(qwen25):
    per_token = bytes_per_token(qwen25.config, qwen25.dtype)
    a = prepare(qwen25, {"prompt": "a", "max_tokens": 40, "seed": 1})
    b = prepare(qwen25, {"prompt": "b", "max_tokens": 40, "seed": 2})
    need = (len(a.prompt_ids) + 40) * per_token
    engine = Engine(qwen25.model, kv_memory=int(need * 1.5))  # room for one at a time
    order: list[str] = []
    engine.add(a.engine_request(qwen25), lambda e: order.append("a"))
    engine.add(b.engine_request(qwen25), lambda e: order.append("b"))
    engine.step()
    assert engine.stats()["active"] == 1 and engine.stats()["queued"] == 1
    while engine.has_work():
        engine.step()
    assert order == ["a"] * 41 + ["b"] * 41  # b waited for a's memory
    with pytest.raises(KVMemoryExceeded, match=r"more than the engine's budget"):
        Engine(qwen25.model, kv_memory=need // 2).add(a.engine_request(qwen25), lambda e: None)
    with pytest.raises(ConfigError, match="prefill_chunk"):
        Engine(qwen25.model, prefill_chunk=0)


def test_cancel_frees_the_row_at_the_next_step(qwen25):
    engine = Engine(qwen25.model)
    events: list = []
    keep = prepare(qwen25, {"prompt": "stay", "max_tokens": 20, "seed": 1})
    quit_ = prepare(qwen25, {"prompt": "go", "max_tokens": 1000, "seed": 2})
    engine.add(keep.engine_request(qwen25), lambda e: None)
    handle = engine.add(quit_.engine_request(qwen25), events.append)
    for _ in range(3):
        engine.step()
    handle.cancel()
    engine.step()
    assert engine.stats()["active"] == 1 and handle.cache is None
    count = len(events)
    while engine.has_work():
        engine.step()
    assert len(events) == count and all(isinstance(e, Token) for e in events)


# ------------------------------------------------------------------------------------ the decode modes


@pytest.mark.parametrize("exact", [True, False])
def test_generate_and_the_stream_share_one_output_path(qwen25, exact):
    body = {"prompt": "Tell me all about PEP-8", "max_tokens": 12, "seed": 5, "temperature": 1.1}
    streamed = stream_bytes(qwen25, prepare(qwen25, {**body, "stream": True}), Engine(qwen25.model, exact=exact))
    direct = list(qwen_ref.generate(qwen25, {**body, "stream": True}, exact=exact))
    assert without_padding(streamed) == without_padding(direct) and len(streamed) > 3


def test_n_samples_share_one_prefill(qwen25):
    body = {"prompt": "Tell me all about PEP-8", "max_tokens": 10, "seed": 7, "temperature": 1.3}
    prompt_len = len(prepare(qwen25, body).prompt_ids)
    prompt_passes: list[int] = []  # tokens of each pass that feeds prompt positions
    begin = qwen25.model.begin

    def recording_begin(input_ids, cache=None, *args, **kwargs):
        if cache is not None and int(cache.lengths.max()) < prompt_len:
            prompt_passes.append(input_ids.shape[1])
        return begin(input_ids, cache, *args, **kwargs)

    qwen25.model.begin = recording_begin
    try:
        outs = qwen_ref.generate(qwen25, body, n=4)
    finally:
        del qwen25.model.begin
    assert sum(prompt_passes) == prompt_len  # the prompt went through the model once, for all four samples
    assert outs == [qwen_ref.generate(qwen25, {**body, "seed": s}) for s in (7, 8, 9, 10)]


def test_row_caches_attend_as_each_row_alone(qwen25):
    model = qwen25.model
    prompts = [[9707, 11, 1879], [9707, 11, 1879, 0, 576, 9707]]
    caches, rows = [], []
    for p in prompts:
        c = KVCache(model.config, 1, 16, dtype=qwen25.dtype)
        rows.append(model(torch.tensor([p]), cache=c, last_only=True)[0, 0])
        caches.append(c)
    alone = []
    for c in caches:
        twin = c.clone()
        twin.grow(16)
        alone.append(model(torch.tensor([[5]]), cache=twin)[0, 0])
    together = model(torch.tensor([[5], [5]]), cache=RowCaches(caches))[:, 0]
    torch.testing.assert_close(together, torch.stack(alone), rtol=0, atol=1e-5)
    assert [int(c.lengths[0]) for c in caches] == [4, 7]


def test_typed_errors_carry_the_services_status_and_code():
    assert (NonFiniteLogits("x").status, NonFiniteLogits("x").code) == (500, 500)
    assert (KVMemoryExceeded("x").status, KVMemoryExceeded("x").code) == (413, 3006)
    assert isinstance(Failed(NonFiniteLogits("x")).error, QwenRefError) and Finished("stop").reason == "stop"


def test_rows_stop_independently(tiny):
    model = qwen_ref.load(tiny("qwen2.5")).model
    prompts = [[9707, 11, 1879, 0], [40, 1079]]
    free = generate_ids(model, prompts, 6)
    stop = free[0][2]
    out = generate_ids(model, prompts, [6, 3], stop_ids=[stop])
    assert out[0] == free[0][: free[0].index(stop) + 1]  # the stop token is emitted, then the row ends
    expected = free[1][:3]
    if stop in expected:
        expected = expected[: expected.index(stop) + 1]
    assert out[1] == expected
    assert [len(o) for o in generate_ids(model, prompts, [2, 0])] == [2, 0]


def test_engine_rejects_empty_prompts(tiny):
    model = qwen_ref.load(tiny("qwen2.5")).model
    with pytest.raises(InvalidInput, match="at least one token"):
        generate_ids(model, [[]], 3)
    with pytest.raises(InvalidInput, match="max_new_tokens"):
        generate_ids(model, [[1]], -1)


def test_cache_capacity_is_enforced(tiny):
    model = qwen_ref.load(tiny("qwen2.5")).model
    cache = KVCache(model.config, 1, 4, dtype=torch.float32)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        model(torch.tensor([[4]]), cache=cache)
        with pytest.raises(CacheFullError, match="capacity 4"):
            model(torch.tensor([[5]]), cache=cache)
    assert cache.lengths.tolist() == [4]
    assert not any("cache" in k for k in model.state_dict())


def test_a_pass_run_a_layer_at_a_time_is_the_forward(qwen15):
    model = qwen15.model
    ids = torch.tensor([[9707, 11, 1879, 0, 576, 9707, 11]])
    whole_cache, sliced_cache = (KVCache(model.config, 1, 16, dtype=qwen15.dtype) for _ in range(2))
    whole = model(ids, cache=whole_cache, last_only=True)
    p = model.begin(ids, cache=sliced_cache)
    steps = 0
    while not model.run_layers(p, 1):
        steps += 1
    sliced = model.end(p, last_only=True)
    assert steps == len(model.model.layers) - 1 and torch.equal(whole, sliced)
    assert all(torch.equal(a, b) for a, b in zip(whole_cache.k + whole_cache.v, sliced_cache.k + sliced_cache.v))


def test_the_sampled_rows_are_a_view_only_of_consecutive_rows_of_one_tensor():
    from qwen_ref.engine.engine import _rows

    step = torch.randn(4, 10)
    view = _rows(list(step))  # a decode step's logits: no copy
    assert torch.equal(view, step) and view.data_ptr() == step.data_ptr()
    for rows in ([step[0], step[2], step[3]], [step[1], step[0]], [step[0], step[0]],  # gaps, order, one row twice
                 [step[0], torch.randn(10)], [step[0, :5], step[1, :5]], [step[:, 0], step[:, 1]]):
        out = _rows(rows)
        assert torch.equal(out, torch.stack(rows)) and out.data_ptr() != step.data_ptr()
