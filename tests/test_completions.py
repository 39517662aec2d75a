"""Prompt logprobs in the engine (the numbers `qwen-ref score` gives, bit for bit) and OpenAI's completions route
with the official client: text and token-id prompts, batches, echo, logprobs, max_tokens 0, n, stop, stream."""

from __future__ import annotations

import pytest
from server_helpers import (
    QWEN15,
    TOKEN,
    one_thread_fixture,  # noqa: F401 (a fixture)
    qwen15_fixture,  # noqa: F401 (a fixture)
    srv_fixture,  # noqa: F401 (a fixture)
)

import qwen_ref
from qwen_ref.engine import Engine, EngineRequest, Finished, Prompt, Token
from qwen_ref.oracle.score import score
from qwen_ref.sampling import RequestState

TEXT = ("The quick brown fox jumps over the lazy dog. " * 4 + "Pack my box with five dozen liquor jugs. " * 4).strip()


def _run(qwen, ids, max_tokens, prompt_logprobs, params=None, **engine_options):
    events = []
    engine = Engine(qwen.model, **engine_options)
    state = RequestState.start(params or {"temperature": 0}, ids)
    engine.add(EngineRequest(list(ids), max_tokens, state, frozenset(qwen.eos_token_ids),
                             prompt_logprobs=prompt_logprobs), events.append)
    while engine.has_work():
        engine.step()
    return events


@pytest.mark.parametrize("context", [1, 20, 33, 64])
def test_prompt_logprobs_equal_score_bit_for_bit(qwen15, context):
    ids = qwen15.tokenizer.encode(TEXT)
    assert len(ids) > 2 * 32  # the prompt spans three prefill chunks
    events = _run(qwen15, ids, 0, 2)
    assert isinstance(events[0], Prompt) and events[1:] == [Finished("length")]
    infos = events[0].logprobs
    assert [i.token for i in infos] == ids[1:]
    records = list(score(qwen15, [{"prompt_ids": ids[:context], "token_ids": ids[context:]}], top_n=2))
    assert [r["logprob"] for r in records] == [i.raw for i in infos[context - 1:]]
    assert [[t["logprob"] for t in r["top"]] for r in records] == [[lp for _, lp in i.raw_top]
                                                                   for i in infos[context - 1:]]


def test_scoring_the_prompt_leaves_the_generated_tokens_alone(qwen15):
    ids = qwen15.tokenizer.encode(TEXT)
    params = {"temperature": 1.3, "seed": 11}
    plain = [e.token for e in _run(qwen15, ids, 6, None, params) if isinstance(e, Token)]
    scored = _run(qwen15, ids, 6, 0, params)
    assert isinstance(scored[0], Prompt) and all(i.raw_top == () for i in scored[0].logprobs)
    assert [e.token for e in scored if isinstance(e, Token)] == plain


def test_prompt_logprobs_do_not_depend_on_the_layer_slicing(qwen15):
    # prefill_ratio makes chunks run a layer at a time beside decoding requests; the numbers stay
    ids = qwen15.tokenizer.encode(TEXT)
    alone = _run(qwen15, ids, 0, 1)[0].logprobs
    engine = Engine(qwen15.model, prefill_ratio=0.01)
    other, events = [], []
    other_ids = qwen15.tokenizer.encode("hello")
    engine.add(EngineRequest(other_ids, 40, RequestState.start({"temperature": 0}, other_ids),
                             frozenset()), other.append)
    engine.step()
    engine.step()
    engine.add(EngineRequest(ids, 0, RequestState.start({"temperature": 0}, ids), frozenset(), prompt_logprobs=1),
               events.append)
    while engine.has_work():
        engine.step()
    assert events[0].logprobs == alone


# ----------------------------------------------------------------------------------------------------------
# The route, with the official client


@pytest.fixture()
def client(srv):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{srv.base}/v1", api_key=TOKEN, max_retries=0)


def test_completion_is_the_raw_prompt_continued(client, qwen15):
    out = client.completions.create(model=QWEN15, prompt="Once upon a time", max_tokens=8, seed=5, temperature=0.8)
    ours = qwen_ref.generate(qwen15, {"prompt": "Once upon a time", "raw": True, "max_tokens": 8, "seed": 5,
                                      "temperature": 0.8})
    assert out.object == "text_completion" and out.choices[0].text == ours["response"]
    assert out.usage.prompt_tokens == ours["usage"]["prompt_tokens"]
    assert out.choices[0].finish_reason in ("stop", "length")


def test_echo_with_logprobs_scores_the_prompt_as_score_does(client, qwen15):
    ids = qwen15.tokenizer.encode(TEXT)
    out = client.completions.create(model=QWEN15, prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0)
    (choice,) = out.choices
    assert choice.text == qwen15.tokenizer.decode(ids) and out.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.tokens) == len(ids)
    records = list(score(qwen15, [{"prompt_ids": ids[:1], "token_ids": ids[1:]}], top_n=1))
    assert lp.token_logprobs[1:] == [r["logprob"] for r in records]
    assert [list(t.values()) for t in lp.top_logprobs[1:]] == [[r["top"][0]["logprob"]] for r in records]
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]


def test_lm_eval_style_loglikelihood_request(client, qwen15):
    # what lm-evaluation-harness's local-completions sends to score a continuation: the echoed prompt plus one
    # generated token, whose logprob it drops ([ctxlen:-1])
    context, continuation = qwen15.tokenizer.encode("Pack my box"), qwen15.tokenizer.encode(" with five dozen")
    out = client.completions.create(model=QWEN15, prompt=[context + continuation], max_tokens=1, echo=True,
                                    logprobs=1, temperature=0, seed=1234)
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == len(context) + len(continuation) + 1
    got = sum(lp.token_logprobs[len(context):-1])
    expected = sum(r["logprob"] for r in score(qwen15, [{"prompt_ids": context, "token_ids": continuation}]))
    assert got == expected


def test_batches_n_and_stop(client, qwen15):
    out = client.completions.create(model=QWEN15, prompt=["a b c", [1, 2, 3]], max_tokens=5, n=2, seed=3,
                                    temperature=1.0)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    for p, prompt in enumerate(["a b c", qwen15.tokenizer.decode([1, 2, 3])]):
        for j in range(2):
            ours = qwen_ref.generate(qwen15, {"prompt": prompt, "raw": True, "max_tokens": 5, "seed": 3 + j,
                                              "temperature": 1.0})
            if p == 0:  # a text prompt tokenizes as the route does; token ids are taken as given
                assert out.choices[p * 2 + j].text == ours["response"]
            else:  # sample j of n is the request with seed + j alone
                alone = client.completions.create(model=QWEN15, prompt=[1, 2, 3], max_tokens=5, seed=3 + j,
                                                  temperature=1.0)
                assert out.choices[p * 2 + j].text == alone.choices[0].text
    first = client.completions.create(model=QWEN15, prompt="a b c", max_tokens=6, temperature=0).choices[0].text
    cut = first[2:4]
    stopped = client.completions.create(model=QWEN15, prompt="a b c", max_tokens=6, temperature=0, stop=[cut])
    assert stopped.choices[0].text == first[: first.find(cut)] and stopped.choices[0].finish_reason == "stop"


def test_streamed_completion_with_echo(client, qwen15):
    plain = client.completions.create(model=QWEN15, prompt="x y", max_tokens=5, seed=2, echo=True, logprobs=1)
    chunks = list(client.completions.create(model=QWEN15, prompt="x y", max_tokens=5, seed=2, echo=True, logprobs=1,
                                            stream=True))
    texts = "".join(c.choices[0].text for c in chunks)
    assert texts == plain.choices[0].text
    logprobs = [v for c in chunks if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert logprobs == plain.choices[0].logprobs.token_logprobs
    offsets = [v for c in chunks if c.choices[0].logprobs for v in c.choices[0].logprobs.text_offset]
    assert offsets == plain.choices[0].logprobs.text_offset
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_a_bad_prompt_in_a_batch_fails_the_request_and_frees_the_rest(srv, client):
    openai = pytest.importorskip("openai")
    for bad in ([2**70], [10**9], [-1]):
        with pytest.raises(openai.BadRequestError, match="/prompt"):
            client.completions.create(model=QWEN15, prompt=["hello world " * 10, bad], max_tokens=3000)
    assert srv.wait_idle()["active"] == 0  # the first prompt's request was cancelled, not left running


def test_max_tokens_0_fits_a_prompt_as_long_as_the_window(qwen15):
    from qwen_ref.errors import ContextWindowExceeded
    from qwen_ref.workers_ai.request import context_window, prepare

    window = context_window(qwen15)
    body = {"prompt": "x", "raw": True}
    assert prepare(qwen15, body, prompt_ids=[1] * window, max_tokens=0).max_tokens == 0
    with pytest.raises(ContextWindowExceeded):
        prepare(qwen15, body, prompt_ids=[1] * window, max_tokens=1)
