"""Real client libraries against a real server on loopback: Cloudflare's Python SDK, the openai client,
LangChain's Cloudflare integration in both its endpoint formats, and lm-evaluation-harness. The tool tests'
server runs with a script (qwen_ref/scripted.py), so the random-weight model writes a tool call when asked
about the weather, and an answer once the tool's result comes back: each client must parse the call, send the
history back and read the answer."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from server_helpers import (
    QWEN15,
    TOKEN,
    one_thread_fixture,  # noqa: F401 (a fixture)
    qwen15_fixture,  # noqa: F401 (a fixture)
    srv_fixture,  # noqa: F401 (a fixture)
    start_server,
    stop_server,
)

requests = pytest.importorskip("requests")

CODER = "@cf/qwen/qwen2.5-coder-32b-instruct"
ACCOUNT = "acct"
CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
ANSWER = "It is sunny in Paris."
PERSON = {"name": "Ada", "age": 36}
RULES = [
    {"when": "<tool_response>", "reply": ANSWER},
    {"when": "weather", "reply": "<tool_call>\n" + json.dumps(CALL) + "\n</tool_call>"},
    {"when": "Ada Lovelace", "reply": "<tool_call>\n" + json.dumps({"name": "Person", "arguments": PERSON})
                                      + "\n</tool_call>"},
    {"when": "JSON please", "reply": json.dumps(PERSON)},
    {"when": "Say hello", "reply": "Hello! How can I help you today?"},
]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather now in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def scripted_srv(tiny, tmp_path_factory):
    script = tmp_path_factory.mktemp("script") / "replies.json"
    script.write_text(json.dumps(RULES))
    srv = start_server(["--timeout", "60", "--script", str(script), "--name", f"{CODER}={tiny('qwen2.5')}"])
    yield srv
    stop_server(srv)


# ----------------------------------------------------------------------------------------------------------
# Cloudflare's Python SDK (the `cloudflare` package), base_url pointed at the server


@pytest.fixture()
def cf(scripted_srv):
    cloudflare = pytest.importorskip("cloudflare")
    return cloudflare.Cloudflare(api_token=TOKEN, base_url=f"{scripted_srv.base}/client/v4", max_retries=0)


def test_cloudflare_sdk_tool_loop(cf):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = cf.ai.run(CODER, account_id=ACCOUNT, messages=ask, tools=[WEATHER_TOOL])
    assert first["tool_calls"] == [CALL] and first["usage"]["completion_tokens"] > 0
    history = [*ask, {"role": "assistant", "content": "", "tool_calls": first["tool_calls"]},
               {"role": "tool", "name": "get_weather", "content": "sunny, 24C"}]
    second = cf.ai.run(CODER, account_id=ACCOUNT, messages=history, tools=[WEATHER_TOOL])
    assert second["response"] == ANSWER and "tool_calls" not in second


def test_cloudflare_sdk_plain_and_errors(cf):
    cloudflare = pytest.importorskip("cloudflare")
    out = cf.ai.run(CODER, account_id=ACCOUNT, prompt="Say hello", max_tokens=30)
    assert out["response"] == "Hello! How can I help you today?"
    with pytest.raises(cloudflare.BadRequestError) as e:
        cf.ai.run(CODER, account_id=ACCOUNT, prompt="Say hello", temperature=9)
    assert "temperature" in str(e.value)
    with pytest.raises(cloudflare.BadRequestError):
        cf.ai.run("@cf/qwen/not-served", account_id=ACCOUNT, prompt="x")


# ----------------------------------------------------------------------------------------------------------
# openai


@pytest.fixture()
def oa(scripted_srv):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{scripted_srv.base}/client/v4/accounts/{ACCOUNT}/ai/v1", api_key=TOKEN,
                         max_retries=0)


def test_openai_tool_loop_plain_and_streamed(oa):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = oa.chat.completions.create(model=CODER, messages=ask, tools=[WEATHER_TOOL])
    (call,) = first.choices[0].message.tool_calls
    assert first.choices[0].finish_reason == "tool_calls" and first.choices[0].message.content is None
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == CALL["arguments"]

    parts: dict[int, dict] = {}
    content = ""
    for chunk in oa.chat.completions.create(model=CODER, messages=ask, tools=[WEATHER_TOOL], stream=True):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for d in delta.tool_calls or []:
            part = parts.setdefault(d.index, {"id": d.id, "name": "", "arguments": ""})
            part["name"] += d.function.name or ""
            part["arguments"] += d.function.arguments or ""
    assert content == "" and [(p["name"], json.loads(p["arguments"])) for p in parts.values()] == \
        [("get_weather", CALL["arguments"])]

    history = [*ask, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24C"}]
    second = oa.chat.completions.create(model=CODER, messages=history, tools=[WEATHER_TOOL])
    assert second.choices[0].message.content == ANSWER and second.choices[0].finish_reason == "stop"


def test_openai_forced_tool_choice_on_an_unscripted_prompt(oa):
    # no rule matches: the random model writes, and the grammar makes it a valid call of the named tool
    out = oa.chat.completions.create(model=CODER, messages=[{"role": "user", "content": "Anything"}],
                                     tools=[{"type": "function", "function": {
                                         "name": "pick", "parameters": {
                                             "type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                                                    "maximum": 9}},
                                             "required": ["n"], "additionalProperties": False}}}],
                                     tool_choice={"type": "function", "function": {"name": "pick"}}, max_tokens=200,
                                     seed=4)
    (call,) = out.choices[0].message.tool_calls
    args = json.loads(call.function.arguments)
    assert call.function.name == "pick" and set(args) == {"n"} and 0 <= args["n"] <= 9


def test_openai_completions_keep_the_text_as_generated(oa):
    # a completion has no tool calls: the markup stays in the text, and the script runs with the prompt scored
    prompt = "Q: what is the weather in Paris? A:"
    out = oa.completions.create(model=CODER, prompt=prompt, max_tokens=64)
    reply = "<tool_call>\n" + json.dumps(CALL) + "\n</tool_call>"
    assert out.choices[0].text == reply and out.choices[0].finish_reason == "stop"
    echoed = oa.completions.create(model=CODER, prompt=prompt, max_tokens=64, echo=True, logprobs=0)
    assert echoed.choices[0].text == prompt + reply
    assert echoed.choices[0].logprobs.token_logprobs[0] is None


# ----------------------------------------------------------------------------------------------------------
# LangChain's Cloudflare integration (langchain-cloudflare), in both endpoint formats


@pytest.fixture(params=["workers_ai", "openai_compatible"])
def lc(scripted_srv, request):
    chat_models = pytest.importorskip("langchain_cloudflare.chat_models")
    return chat_models.ChatCloudflareWorkersAI(
        model=CODER, cloudflare_account_id=ACCOUNT, cloudflare_api_token=TOKEN,
        base_url=f"{scripted_srv.base}/client/v4", endpoint_format=request.param, max_tokens=64)


def test_langchain_invoke_and_stream(lc):
    assert lc.invoke("Say hello").content == "Hello! How can I help you today?"
    assert "".join(chunk.content for chunk in lc.stream("Say hello")) == "Hello! How can I help you today?"


def test_langchain_bind_tools_loop(lc):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """The weather now in a city."""
        return "sunny, 24C"

    llm = lc.bind_tools([get_weather])
    messages = [HumanMessage("What is the weather in Paris?")]
    first = llm.invoke(messages)
    (call,) = first.tool_calls
    assert call["name"] == "get_weather" and call["args"] == CALL["arguments"]
    messages += [first, ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])]
    assert llm.invoke(messages).content == ANSWER


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_langchain_structured_output(lc, method):
    from pydantic import BaseModel

    class Person(BaseModel):
        name: str
        age: int

    prompt = "Extract: Ada Lovelace, 36." if method == "function_calling" else "Ada, 36. JSON please"
    out = lc.with_structured_output(Person, method=method).invoke(prompt)
    assert out == Person(**PERSON)


# ----------------------------------------------------------------------------------------------------------
# lm-evaluation-harness: its local-completions model on a local JSONL task, loglikelihood and generate_until

DOCS = [{"question": "The capital of France is", "choices": ["Paris", "Rome", "a city"], "answer": 0},
        {"question": "Two plus two equals", "choices": ["four", "five"], "answer": 0}]
TASKS = {
    "qwen_ref_mc": "output_type: multiple_choice\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\n"
                   "metric_list:\n  - metric: acc\n",
    "qwen_ref_gen": "output_type: generate_until\ndoc_to_target: \"{{choices[0]}}\"\ngeneration_kwargs:\n"
                    "  until: [\"\\n\"]\n  max_gen_toks: 8\n  do_sample: false\n  temperature: 0\n"
                    "metric_list:\n  - metric: exact_match\n",
}


def _lm_eval_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    # how lm-evaluation-harness splits a request into token ids: the whole text encoded once, the context's
    # tokens cut off the front (trailing spaces of the context move to the continuation first)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    return ctx, whole[len(ctx):]


def test_lm_eval_local_completions_equals_score(srv, tiny, qwen15, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from qwen_ref.oracle.score import score

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OPENAI_API_KEY", TOKEN)  # what local-completions sends as its bearer token
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    for name, body in TASKS.items():
        (tmp_path / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\ndoc_to_text: \"{{{{question}}}}\"\n{body}")
    results = lm_eval.simple_evaluate(
        model="local-completions", tasks=list(TASKS), task_manager=TaskManager(include_path=str(tmp_path)),
        model_args={"model": QWEN15, "base_url": f"{srv.base}/v1/completions", "tokenizer_backend": "huggingface",
                    "tokenizer": str(tiny("qwen1.5")), "num_concurrent": 1, "max_retries": 1},
        log_samples=True)
    samples = results["samples"]
    tok = qwen15.tokenizer
    for sample in samples["qwen_ref_mc"]:
        doc = sample["doc"]
        for (context, continuation), (loglikelihood, greedy) in zip(sample["arguments"], sample["filtered_resps"]):
            ctx, cont = _lm_eval_pair(tok, context, continuation)
            records = list(score(qwen15, [{"prompt_ids": ctx, "token_ids": cont}], top_n=1))
            assert loglikelihood == sum(r["logprob"] for r in records), doc
            assert greedy == all(r["rank"] == 1 for r in records)
    for sample in samples["qwen_ref_gen"]:
        (text,) = sample["filtered_resps"]
        ids = tok.encode(sample["doc"]["question"])
        out = qwen_ref_generate(qwen15, ids, 8)
        assert text == out.split("\n")[0]
    assert len(samples["qwen_ref_mc"]) == len(samples["qwen_ref_gen"]) == len(DOCS)


def qwen_ref_generate(qwen, ids: list[int], max_tokens: int) -> str:
    from qwen_ref.engine import generate_ids

    (out,) = generate_ids(qwen.model, [ids], max_tokens, stop_ids=qwen.eos_token_ids)
    return qwen.tokenizer.decode([t for t in out if t not in qwen.eos_token_ids])


# ----------------------------------------------------------------------------------------------------------
# The JS AI SDK: Cloudflare's workers-ai-provider and @ai-sdk/openai-compatible (tests/js, where node is present)

JS = Path(__file__).parent / "js"


def _js_clients() -> str:
    """The node binary once tests/js has its pinned packages (npm ci from the lockfile on first use)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are not installed: the AI SDK clients cannot run")
    if not (JS / "node_modules" / "ai").is_dir():
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS, capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            pytest.skip(f"npm ci could not install the AI SDK packages (no registry?): {done.stderr[-300:]}")
    return node


def test_ai_sdk_providers(scripted_srv):
    node = _js_clients()
    done = subprocess.run([node, str(JS / "ai_sdk_clients.mjs"), scripted_srv.base, TOKEN, CODER],
                          capture_output=True, text=True, timeout=300)
    checks = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0 and all(c["ok"] for c in checks), done.stdout + done.stderr[-2000:]
    providers, names = ("workers-ai-provider", "openai-compatible"), ("generateText", "streamText", "tool loop")
    assert {(c["provider"], c["check"]) for c in checks} == {(p, c) for p in providers for c in names}
