"""generate(): the Workers AI request/response contract, end to end on the tiny checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

import qwen_ref
from qwen_ref.errors import ContextWindowExceeded, InvalidInput, LoraUnavailable
from qwen_ref.workers_ai.generate import generate
from qwen_ref.workers_ai.request import prepare
from qwen_ref.workers_ai.validate import validate_output

SYSTEM = {"role": "system", "content": "You are a friendly assistant"}
SEED_REQUESTS = [
    {"messages": [SYSTEM, {"role": "user", "content": "What is the origin of the phrase Hello, World"}]},
    {"messages": [SYSTEM, {"role": "user", "content": "Tell me all about PEP-8"}]},
    {"messages": [SYSTEM, {"role": "user", "content": "Why is pizza so good"}]},
    {"prompt": "Tell me all about PEP-8"},
]


@pytest.fixture(scope="module")
def qwen25(tiny):
    return qwen_ref.load(tiny("qwen2.5"))


@pytest.fixture(scope="module")
def qwen15(tiny):
    return qwen_ref.load(tiny("qwen1.5"))


@pytest.mark.parametrize("request_body", SEED_REQUESTS)
def test_seed_examples_produce_valid_outputs(qwen15, request_body):
    out = generate(qwen15, {**request_body, "max_tokens": 16, "seed": 1})
    validate_output(out)
    assert set(out) == {"response", "usage"}
    assert out["usage"]["completion_tokens"] <= 16
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]


@pytest.mark.parametrize("preset", ["qwen1.5", "qwen2.5"])
def test_prompt_tokens_are_the_chat_template_tokens(tiny, preset):
    """prompt -> one user message through the checkpoint's template; raw -> the text as is."""
    q = qwen_ref.load(tiny(preset))
    hf = AutoTokenizer.from_pretrained(tiny(preset))
    for body, messages in [
        ({"prompt": "Tell me all about PEP-8"}, [{"role": "user", "content": "Tell me all about PEP-8"}]),
        (SEED_REQUESTS[0], SEED_REQUESTS[0]["messages"]),
    ]:
        out = generate(q, {**body, "max_tokens": 1})
        expected = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
        assert out["usage"]["prompt_tokens"] == len(expected)
    raw = generate(q, {"prompt": "Hello, world!", "raw": True, "max_tokens": 1})
    assert raw["usage"]["prompt_tokens"] == 4


def test_same_seed_same_output_and_defaults(qwen25):
    body = {"prompt": "Why is pizza so good", "max_tokens": 20, "seed": 1234, "top_k": 40, "top_p": 0.95,
            "repetition_penalty": 1.1, "frequency_penalty": 0.5, "presence_penalty": 0.5}
    a, b = generate(qwen25, body), generate(qwen25, dict(body))
    assert a == b
    c = generate(qwen25, {**body, "seed": 1235})
    assert c != a  # a different seed draws differently (random model, spread-out distribution)


def test_greedy_equals_the_engine(qwen25):
    from qwen_ref.engine import generate_ids
    from qwen_ref.tokenizer.detok import detokenize

    body = {"prompt": "Hello", "raw": True, "temperature": 0, "max_tokens": 24}
    out = generate(qwen25, body)
    ids = generate_ids(qwen25.model, [qwen25.tokenizer.encode("Hello")], 24, stop_ids=qwen25.eos_token_ids)[0]
    assert out["response"] == detokenize(qwen25.tokenizer, ids)
    assert out["usage"]["completion_tokens"] == len(ids)


def parse_sse(stream) -> list[str]:
    """A strict parser for the service's SSE framing: 'data: <payload>\\n\\n' events, nothing else."""
    raw = b"".join(stream)
    assert raw.endswith(b"data: [DONE]\n\n")
    events = raw.split(b"\n\n")
    assert events[-1] == b""
    payloads = []
    for e in events[:-1]:
        assert e.startswith(b"data: ") and b"\n" not in e, e
        payloads.append(e[len(b"data: "):].decode("utf-8"))
    return payloads


def test_stream_matches_non_stream(qwen25):
    body = {"messages": SEED_REQUESTS[2]["messages"], "max_tokens": 40, "seed": 99, "temperature": 1.5}
    out = generate(qwen25, body)
    payloads = parse_sse(generate(qwen25, {**body, "stream": True}))
    assert payloads[-1] == "[DONE]"
    events = [json.loads(p) for p in payloads[:-1]]
    chunks, final = events[:-1], events[-1]
    for c in chunks:
        assert set(c) == {"response", "p"} and c["response"] and c["p"]
        assert "abcdefghijklmnopqrstuvwxyz0123456789".startswith(c["p"][:36])
    assert "".join(c["response"] for c in chunks) == out["response"]
    assert final == {"response": "", "usage": out["usage"]}


def test_stream_with_the_sseclient_parser(qwen25):
    """A real SSE client library reads our bytes the same way."""
    sseclient = pytest.importorskip("sseclient")
    body = {"prompt": "Hello", "max_tokens": 10, "seed": 5, "stream": True}
    payloads = parse_sse(generate(qwen25, body))
    client_events = [e.data for e in sseclient.SSEClient(iter(generate(qwen25, body))).events()]

    def unpadded(data: str) -> object:  # the padding "p" is random by design
        return data if data == "[DONE]" else {k: v for k, v in json.loads(data).items() if k != "p"}

    assert [unpadded(d) for d in client_events] == [unpadded(d) for d in payloads]


def test_stream_never_splits_a_character(qwen25):
    # high temperature over a random model draws plenty of multi-byte fragments
    payloads = parse_sse(generate(qwen25, {"prompt": "日本語", "max_tokens": 60, "seed": 3, "temperature": 5,
                                           "stream": True}))
    for p in payloads[:-2]:
        json.loads(p)["response"].encode("utf-8")  # no lone surrogates: every chunk is whole characters


def test_batch_equals_each_request_alone(qwen25):
    bodies = [
        {"prompt": "Hello", "max_tokens": 8, "seed": 1},
        {"prompt": "Tell me all about PEP-8", "max_tokens": 12, "seed": 2, "temperature": 1.2, "top_k": 5},
        {"messages": SEED_REQUESTS[0]["messages"], "max_tokens": 5, "temperature": 0},
        {"prompt": "x", "raw": True, "max_tokens": 9, "seed": 3, "repetition_penalty": 1.5, "top_p": 0.5},
    ]
    together = generate(qwen25, bodies)
    assert together == [generate(qwen25, b) for b in bodies]
    assert generate(qwen25, bodies[::-1]) == together[::-1]


class Scripted(torch.nn.Module):
    """The real model, with its logits overridden so that row 0 emits `script` token by token."""

    def __init__(self, model, script):
        super().__init__()
        self.inner, self.script, self.i = model, script, 0
        self.config, self.lm_head, self.backends = model.config, model.lm_head, model.backends

    def new_cache(self, *args, **kwargs):
        return self.inner.new_cache(*args, **kwargs)

    def begin(self, *args, **kwargs):
        return self.inner.begin(*args, **kwargs)

    def run_layers(self, *args, **kwargs):
        return self.inner.run_layers(*args, **kwargs)

    def end(self, p, last_only=False, compute_logits=True):
        logits = self.inner.end(p, last_only, compute_logits)
        if logits is None:  # a prefill chunk before the prompt's last
            return logits
        if self.i < len(self.script):
            logits[:, -1] = -1e4
            logits[:, -1, self.script[self.i]] = 1e4
        self.i += 1
        return logits

    def forward(self, input_ids, cache=None, num_new=None, last_only=False, lora=None, compute_logits=True):
        p = self.begin(input_ids, cache, num_new, lora)
        self.run_layers(p)
        return self.end(p, last_only, compute_logits)


def test_tool_call_end_to_end(qwen25):
    tools = [{"name": "getWeather", "description": "Get the weather",
              "parameters": {"type": "object", "properties": {
                  "city": {"type": "string", "description": "The city"}}, "required": ["city"]}}]
    text = 'Let me check.\n<tool_call>\n{"name": "getWeather", "arguments": {"city": "London"}}\n</tool_call>'
    script = [*qwen25.tokenizer.encode(text), 151645]
    scripted = qwen_ref.Qwen(Scripted(qwen25.model, script), qwen25.tokenizer, qwen25.config, qwen25.path,
                             qwen25.generation_config)
    out = generate(scripted, {"messages": [{"role": "user", "content": "Weather in London?"}], "tools": tools,
                              "max_tokens": 64})
    validate_output(out)
    assert out["tool_calls"] == [{"name": "getWeather", "arguments": {"city": "London"}}]
    assert out["response"] == "Let me check."
    assert out["usage"]["completion_tokens"] == len(script)  # the eos token counts, as it does at the service


@pytest.mark.parametrize(("text", "shown", "calls"), [
    ('Let me check.\n<tool_call>\n{"name": "getWeather", "arguments": {"city": "London"}}\n</tool_call>',
     "Let me check.\n", [{"name": "getWeather", "arguments": {"city": "London"}}]),
    ('<tool_call>\n{"name": "getWeather", "arguments": {"city": "Oslo"}}\n</tool_call>\nThen I answer.',
     "Then I answer.", [{"name": "getWeather", "arguments": {"city": "Oslo"}}]),
    ("a < b, and <tool is not a call", "a < b, and <tool is not a call", []),
    ("<tool_call>\nnot json\n</tool_call>", "<tool_call>\nnot json\n</tool_call>", []),
])
def test_a_stream_with_tools_never_shows_call_markup(qwen25, text, shown, calls):
    """Text streams as it is generated; only a (possible) <tool_call> is held back; the final event has the calls."""
    tools = [{"name": "getWeather", "description": "Get the weather",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    script = [*qwen25.tokenizer.encode(text), 151645]
    scripted = qwen_ref.Qwen(Scripted(qwen25.model, script), qwen25.tokenizer, qwen25.config, qwen25.path,
                             qwen25.generation_config)
    body = {"messages": [{"role": "user", "content": "Weather?"}], "tools": tools, "max_tokens": 64, "stream": True}
    events = [json.loads(p) for p in parse_sse(generate(scripted, body))[:-1]]
    texts = [e["response"] for e in events[:-1]]
    assert "".join(texts) == shown
    if calls:
        assert all("<tool_call>" not in t for t in texts)
    assert events[-1].get("tool_calls", []) == calls
    if calls and shown.startswith("Let me"):
        assert texts[0].startswith("Let")  # the text before the call came out before the call was generated


def test_context_window_names_both_numbers(qwen25):
    with pytest.raises(ContextWindowExceeded, match=r"maximum context length is 32768 tokens.*requested 32767 "
                                                     r"output tokens.*prompt contains \d+ input tokens"):
        generate(qwen25, {"prompt": "Hello", "max_tokens": 32767})


def test_lora_is_refused_clearly(qwen25):
    with pytest.raises(LoraUnavailable, match="lora: 'my-adapter'"):
        generate(qwen25, {"prompt": "Hello", "lora": "my-adapter"})


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({}, "/"),
        ({"prompt": ""}, "/prompt"),
        ({"prompt": "x", "temperature": 5.5}, "/temperature"),
        ({"prompt": "x", "temprature": 1}, "/temprature"),
        ({"messages": [{"role": "user"}]}, "/messages/0/content"),
        ("not an object", "/"),
    ],
)
def test_bad_requests_raise_invalid_input_before_any_work(qwen25, body, path):
    with pytest.raises(InvalidInput) as e:
        generate(qwen25, body, strict=True)  # strict: an unknown key (the typo) is an error too
    assert e.value.path == path


def test_unknown_keys_are_ignored_unless_strict(qwen25):
    body = {"prompt": "x", "max_tokens": 3, "seed": 1}
    sent = {**body, "stop": None, "tool_choice": "auto", "options": {"rejectIfBusy": True}}
    assert generate(qwen25, sent) == generate(qwen25, body)  # as the service: extra keys change nothing
    with pytest.raises(InvalidInput, match="unknown key 'options'"):  # the first in key order
        generate(qwen25, sent, strict=True)


def test_a_bad_request_in_a_batch_names_its_index(qwen25):
    with pytest.raises(InvalidInput) as e:
        generate(qwen25, [{"prompt": "ok"}, {"prompt": "x", "top_k": 0}])
    assert e.value.path == "/1/top_k"
    with pytest.raises(InvalidInput, match="stream"):
        generate(qwen25, [{"prompt": "ok", "stream": True}])


def test_functions_are_accepted_and_ignored(qwen25):
    base = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "seed": 8}
    with_functions = {**base, "functions": [{"name": "f", "code": "return 1"}]}
    assert generate(qwen25, with_functions) == generate(qwen25, base)


def test_json_mode_returns_a_parsed_value(qwen25):
    pytest.importorskip("llguidance")
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["name", "n"], "additionalProperties": False}
    body = {"prompt": "JSON please", "response_format": {"type": "json_schema", "json_schema": schema},
            "max_tokens": 120, "seed": 11}
    out = generate(qwen25, body)
    validate_output(out, body["response_format"])
    assert set(out["response"]) == {"name", "n"}
    streamed = [json.loads(p) for p in parse_sse(generate(qwen25, {**body, "stream": True}))[:-1]]
    assert json.loads("".join(e["response"] for e in streamed)) == out["response"]


def test_logprobs_extension(qwen25):
    """raw logprobs are log_softmax of the model's logits at each generated position; final ones are under
    the sampling distribution; streamed events carry the same records."""
    from qwen_ref.sampling import distribution

    body = {"prompt": "Hello", "raw": True, "max_tokens": 6, "seed": 3, "temperature": 0.9, "top_k": 5,
            "logprobs": 3}
    out = generate(qwen25, body)
    validate_output(out)
    records = out["logprobs"]
    assert len(records) == out["usage"]["completion_tokens"]
    prompt = qwen25.tokenizer.encode("Hello")
    ids = prompt + [r["id"] for r in records]
    with torch.no_grad():
        logits = qwen25.model(torch.tensor([ids]))[0]
    for i, r in enumerate(records):
        z = logits[len(prompt) - 1 + i]
        raw = torch.log_softmax(z.double(), -1)
        assert abs(r["logprob"] - raw[r["id"]].item()) <= 1e-4
        assert [a["id"] for a in r["top_logprobs"]] == raw.topk(3).indices.tolist()
        params = {k: body[k] for k in ("temperature", "top_k", "seed")}
        p = distribution(z, params, prompt, ids[len(prompt) : len(prompt) + i])
        assert abs(r["sampling_logprob"] - float(torch.log(p[r["id"]]))) <= 1e-4
        assert len(r["top_sampling_logprobs"]) == 3 and r["text"] == qwen25.tokenizer.decode([r["id"]])
    streamed = [json.loads(p) for p in parse_sse(generate(qwen25, {**body, "stream": True}))[:-1]]
    assert [r for e in streamed for r in e.get("logprobs", [])] == records
    assert "logprobs" not in generate(qwen25, {k: v for k, v in body.items() if k != "logprobs"})
    with pytest.raises(InvalidInput, match="/logprobs"):
        generate(qwen25, {**body, "logprobs": 21})


def test_n_samples_share_the_prefill_and_equal_each_sample_alone(qwen25):
    from qwen_ref.sampling import sample_seed

    body = {"prompt": "Tell me all about PEP-8", "max_tokens": 10, "seed": 9999999998, "temperature": 1.3,
            "top_p": 0.95, "repetition_penalty": 1.2}
    outs = generate(qwen25, body, n=4)
    seeds = [sample_seed(body["seed"], i) for i in range(4)]
    assert seeds == [9999999998, 9999999999, 1, 2]
    assert outs == [generate(qwen25, {**body, "seed": s}) for s in seeds]
    assert len({o["response"] for o in outs}) > 1
    unseeded = generate(qwen25, {k: v for k, v in body.items() if k != "seed"}, n=3)
    assert len(unseeded) == 3
    with pytest.raises(InvalidInput, match="n: 0"):
        generate(qwen25, body, n=0)
    with pytest.raises(InvalidInput, match="n > 1"):
        generate(qwen25, {**body, "stream": True}, n=2)


def test_exact_batches_equal_alone_at_16_rows(qwen15):
    """The case where a batched matmul rounds differently from one row: 16 rows of a flat distribution."""
    bodies = [{"messages": [SYSTEM, {"role": "user", "content": f"Question {i}"}], "max_tokens": 24,
               "seed": 100 + i, "temperature": 1.0} for i in range(16)]
    together = generate(qwen15, bodies)
    assert together == [generate(qwen15, b) for b in bodies]
    fast = generate(qwen15, bodies, exact=False)  # allowed to differ at near-ties; still valid outputs
    for out in fast:
        validate_output(out)


TOOLS_OPENAI = [{"type": "function", "function": {"name": "getWeather", "description": "Get the weather",
                                                  "parameters": {"type": "object", "properties": {
                                                      "city": {"type": "string", "description": "The city"}}}}}]
HISTORY = [
    {"role": "user", "content": "Weather in Oslo and Bergen?"},
    {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "getWeather", "arguments": '{"city": "Oslo"}'}}]},  # OpenAI's shape: arguments as JSON text
    {"role": "tool", "content": "12C", "tool_call_id": "call_1", "name": "getWeather"},
    {"role": "assistant", "content": "", "tool_calls": [{"name": "getWeather", "arguments": {"city": "Bergen"}}]},
    {"role": "tool", "content": "9C", "tool_call_id": "call_2"},
]


def test_tool_conversations_render_as_transformers_renders_them(qwen25):
    from transformers import AutoTokenizer

    from qwen_ref.workers_ai.request import prompt_text

    p = prepare(qwen25, {"messages": HISTORY, "tools": TOOLS_OPENAI}, strict=True)  # every key is known
    text, _ = prompt_text(qwen25, p.inputs)
    as_objects = [dict(m) for m in HISTORY]
    as_objects[1] = {**HISTORY[1], "tool_calls": [{**HISTORY[1]["tool_calls"][0], "function": {
        "name": "getWeather", "arguments": {"city": "Oslo"}}}]}
    hf = AutoTokenizer.from_pretrained(qwen25.path)
    assert text == hf.apply_chat_template(as_objects, tools=TOOLS_OPENAI, tokenize=False, add_generation_prompt=True)
    assert '{"name": "getWeather", "arguments": {"city": "Oslo"}}' in text and "<tool_response>\n9C" in text


def test_null_tool_keys_count_as_absent(qwen25):
    # LangChain's Cloudflare integration sends "name": null on tool messages, and clients send tool_calls: null
    nulls = [{**HISTORY[0], "tool_calls": None}, HISTORY[1], {**HISTORY[2], "name": None, "tool_call_id": None},
             *HISTORY[3:]]
    plain = [HISTORY[0], HISTORY[1], {"role": "tool", "content": "12C"}, *HISTORY[3:]]
    assert prepare(qwen25, {"messages": nulls, "tools": TOOLS_OPENAI}, strict=True).prompt_ids == \
        prepare(qwen25, {"messages": plain, "tools": TOOLS_OPENAI}, strict=True).prompt_ids
