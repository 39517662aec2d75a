"""The readers of other backends' outputs (qwen_ref.oracle.formats) and the map of their tokens to our ids
(qwen_ref.oracle.token_map): one hand-written sample per format."""

from __future__ import annotations

import json
import math

import pytest

from qwen_ref.oracle import BackendFileError, TokenMap, read_backend_file, read_backend_object
from qwen_ref.qwen import load


@pytest.fixture(scope="module")
def tmap(tiny):
    ref = load(tiny("qwen2.5"))
    return TokenMap(ref.tokenizer, ref.config.vocab_size)


def ids_of(tmap, records, index=0):
    return [m.id for m in tmap.resolve(records[index].tokens, records[index].text)]


def test_openai_chat_with_request(tmap):
    obj = {"request": {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                       "temperature": 0.5, "top_p": 1.0, "top_k": -1, "logprobs": True, "top_logprobs": 2},
           "response": {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello, world"},
                                     "logprobs": {"content": [
                                         {"token": "Hello", "logprob": -0.5, "bytes": [72, 101, 108, 108, 111],
                                          "top_logprobs": [{"token": "Hello", "logprob": -0.5, "bytes": None},
                                                           {"token": "Hi", "logprob": -1.5, "bytes": [72, 105]}]},
                                         {"token": ",", "logprob": -0.1, "bytes": [44], "top_logprobs": []},
                                         {"token": " world", "logprob": -0.2, "bytes": None, "top_logprobs": []},
                                     ]}}]}}
    records = read_backend_object(obj, "f.jsonl:3")
    (record,) = records
    assert record.request == {"messages": [{"role": "user", "content": "Hi"}]}
    assert record.params == {"temperature": 0.5} and record.logprobs_of == "raw"
    assert ids_of(tmap, records) == [9707, 11, 1879]
    assert [m.via for m in tmap.resolve(record.tokens, None)] == ["bytes", "bytes", "text"]
    assert [a.logprob for a in record.tokens[0].top] == [-0.5, -1.5]


def test_openai_legacy_completions_and_vllm_token_ids(tmap):
    legacy = {"choices": [{"text": "Hello!", "logprobs": {
        "tokens": ["Hello", "bytes:\\x21"], "token_logprobs": [-0.5, -1.0],
        "top_logprobs": [{"Hello": -0.5, " Hi": -2.0}, {"!": -1.0}], "text_offset": [0, 5]}}]}
    records = read_backend_object(legacy, "f:1", "openai")
    assert ids_of(tmap, records) == [9707, 0]
    assert records[0].params is None and "skipped" in records[0].notes[0]
    as_ids = {"choices": [{"message": {"content": "Hello"}, "logprobs": {"content": [
        {"token": "token_id:9707", "logprob": -0.5, "bytes": [1], "top_logprobs": [
            {"token": "token_id:11", "logprob": -1.0}]}]}}]}
    records = read_backend_object(as_ids, "f:2", "vllm")
    assert ids_of(tmap, records) == [9707] and tmap.one(records[0].tokens[0].top[0]).id == 11


def test_fragments_shown_as_replacement_characters_are_recovered_from_the_text(tmap):
    # vLLM shows partial UTF-8 tokens as U+FFFD and writes the UTF-8 of that text as their bytes
    def chat(pieces, text):
        return {"choices": [{"message": {"content": text}, "logprobs": {"content": [
            {"token": p, "logprob": -1.0, "bytes": list(p.encode()), "top_logprobs": []} for p in pieces]}}]}

    records = read_backend_object(chat(["Hello", " \ufffd", "\ufffd", "\ufffd", " llama"], "Hello 🦙 llama"), "f:1")
    mapped = tmap.resolve(records[0].tokens, records[0].text)
    assert [m.id for m in mapped] == [9707, 11162, 99, 247, 93676]
    assert [m.via for m in mapped] == ["bytes", "split", "split", "split", "bytes"]
    # without the output text they cannot be mapped: the comparison would stop at the first
    assert [m.id for m in tmap.resolve(records[0].tokens, None)][:2] == [9707, None]


def test_vllm_offline_request_output(tmap):
    obj = {"prompt": "Hi", "prompt_token_ids": [13048, 9707], "prompt_logprobs": [
        None, {"9707": {"logprob": -3.0, "rank": 4, "decoded_token": "Hello"},
               "11": {"logprob": -1.0, "rank": 1, "decoded_token": ","}}],
        "outputs": [{"index": 0, "text": ", world", "token_ids": [11, 1879], "logprobs": [
            {"11": {"logprob": -0.3, "rank": 1, "decoded_token": ","}},
            {"1879": {"logprob": -4.0, "rank": 3, "decoded_token": " world"},
             "0": {"logprob": -0.5, "rank": 1, "decoded_token": "!"}}]}],
        "sampling_params": {"temperature": 0.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}}
    (record,) = read_backend_object(obj, "f:1")
    assert record.prompt_ids == [13048, 9707] and record.params == {"temperature": 0.0}
    assert record.prompt_tokens[0] is None and record.prompt_tokens[1].id == 9707
    assert record.prompt_tokens[1].logprob == -3.0 and [a.id for a in record.prompt_tokens[1].top] == [11]
    assert [t.id for t in record.tokens] == [11, 1879] and [a.id for a in record.tokens[1].top] == [0]


def test_llama_cpp_shapes(tmap):
    new = {"content": "Hello", "completion_probabilities": [
        {"id": 9707, "token": "Hello", "bytes": [72, 101, 108, 108, 111], "logprob": -0.5,
         "top_logprobs": [{"id": 9707, "token": "Hello", "bytes": [72], "logprob": -0.5}]}],
        "generation_settings": {"temperature": 0.0}, "prompt": "Hi"}
    (record,) = read_backend_object(new, "f:1")
    assert record.logprobs_of == "raw" and record.params == {"temperature": 0} and record.prompt_text == "Hi"
    post = {"completion_probabilities": [{"id": 0, "token": "!", "bytes": [33], "prob": 0.25,
                                          "top_probs": [{"id": 0, "token": "!", "bytes": [33], "prob": 0.25}]}],
            "generation_settings": {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}}
    (record,) = read_backend_object(post, "f:2", "llama.cpp")
    assert record.logprobs_of == "final" and record.tokens[0].logprob == pytest.approx(math.log(0.25))
    assert record.params is None and "min_p=0.05" in record.notes[0]
    old = {"content": "Hello!", "completion_probabilities": [
        {"content": "Hello", "probs": [{"tok_str": "Hello", "prob": 0.5}, {"tok_str": " Hi", "prob": 0.25}]},
        {"content": "byte: \\x21", "probs": [{"tok_str": "byte: \\x21", "prob": 1.0}]}]}
    (record,) = read_backend_object(old, "f:3")
    assert record.logprobs_of == "final" and ids_of(tmap, [record]) == [9707, 0]
    assert record.tokens[0].logprob == pytest.approx(math.log(0.5))


def test_tgi_generate_details(tmap):
    obj = {"request": {"inputs": "Hi", "parameters": {"details": True, "top_n_tokens": 2, "do_sample": True,
                                                       "top_k": 5, "decoder_input_details": True}},
           "response": {"generated_text": "Hello", "details": {
               "prefill": [{"id": 13048, "text": "Hi", "logprob": None}],
               "tokens": [{"id": 9707, "text": "Hello", "logprob": -0.7, "special": False}],
               "top_tokens": [[{"id": 9707, "text": "Hello", "logprob": -0.7, "special": False},
                               {"id": 11, "text": ",", "logprob": -1.7, "special": False}]]}}}
    (record,) = read_backend_object(obj, "f:1")
    assert record.prompt_ids == [13048] and record.prompt_tokens == [None]
    assert record.params == {"temperature": 1.0, "top_k": 5}
    assert [t.id for t in record.tokens] == [9707] and [a.id for a in record.tokens[0].top] == [9707, 11]


def test_plain_jsonl_and_file_errors(tmp_path):
    good = {"prompt_ids": [1, 2], "token_ids": [3], "logprobs": [-0.5], "top_logprobs": [[[3, -0.5], [4, -2.0]]],
            "params": {"temperature": 0}}
    path = tmp_path / "b.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "logprobs": [-0.5, -1]}) + "\n")
    with pytest.raises(BackendFileError, match=r"b.jsonl:3: logprobs must be a list with one entry per token"):
        read_backend_file(path)
    path.write_text(json.dumps(good) + "\n{oops\n")
    with pytest.raises(BackendFileError, match=r"b.jsonl:2: not valid JSON"):
        read_backend_file(path)
    path.write_text(json.dumps({**good, "params": {"top_k": 99}}))
    with pytest.raises(BackendFileError, match=r"b.jsonl:1: params: top_k: 99 is out of range"):
        read_backend_file(path)
    path.write_text(json.dumps({"choices": [{"message": {"content": "x"}}]}))
    with pytest.raises(BackendFileError, match=r"choices\[0\]: has no logprobs"):
        read_backend_file(path)
    path.write_text(json.dumps({"something": 1}))
    with pytest.raises(BackendFileError, match=r"b.jsonl:1: not a format this reads"):
        read_backend_file(path)
    path.write_text("data: {}\n\n")
    with pytest.raises(BackendFileError, match="server-sent events"):
        read_backend_file(path)
    path.write_text(json.dumps([good, good]))
    assert [r.source for r in read_backend_file(path)] == [f"{path}: item 0", f"{path}: item 1"]

