"""The real `fastpeft serve` over HTTP with real clients (openai, httpx): completions, chat, streaming, models list;
each greedy answer equals offline generate with only the request's adapter active."""
from __future__ import annotations

import json

import pytest

from .conftest import ADAPTERS, encode

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def test_models_lists_the_base_and_every_adapter(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "tiny" and sorted(ids[1:]) == sorted(ADAPTERS)


@pytest.mark.parametrize("model", ["lora4", "dora", "peft_lora", "ia3", "tiny", "__base__"])
def test_completion_equals_offline_generate(server, reference, model):
    r = server.client.post("/v1/completions", json={"model": model, "prompt": "The keeper ", "max_tokens": 8,
                                                    "temperature": 0, "return_token_ids": True})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    expected = reference(encode("The keeper "), None if model == "tiny" else model, 8)
    assert choice["token_ids"] == expected
    assert choice["finish_reason"] == ("length" if len(expected) == 8 else "stop")
    assert r.json()["usage"] == {"prompt_tokens": 12, "completion_tokens": len(expected),
                                 "total_tokens": 12 + len(expected)}


def test_openai_client_completion_and_chat(client, reference):
    done = client.completions.create(model="lora16", prompt="abc", max_tokens=5, temperature=0)
    assert done.object == "text_completion" and done.model == "lora16" and done.usage.completion_tokens <= 5
    chat = client.chat.completions.create(model="rslora", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=6, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 6
    assert chat.usage.prompt_tokens == len(encode("<|user|>hi\n<|assistant|>")) - 1  # the template adds no <s>


def test_streamed_completion_equals_the_whole_answer(server):
    body = {"model": "lora1", "prompt": "Streams ", "max_tokens": 10, "temperature": 0, "return_token_ids": True,
            "ignore_eos": True}
    whole = server.client.post("/v1/completions", json=body).json()["choices"][0]
    tokens, text, finish = [], "", None
    with server.client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        chunk = json.loads(line.removeprefix("data: "))
        tokens += chunk["choices"][0]["token_ids"]
        text += chunk["choices"][0]["text"]
        finish = chunk["choices"][0]["finish_reason"] or finish
    assert tokens == whole["token_ids"] and len(tokens) == 10
    assert text == whole["text"] and finish == "length"


def test_openai_client_streamed_chat(client):
    stream = client.chat.completions.create(model="peft_ia3", messages=[{"role": "user", "content": "hello"}],
                                            max_tokens=5, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_stop_string_and_seeded_sampling(server):
    body = {"model": "lora4", "prompt": "The keeper ", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    text = server.client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    stop = next(c for c in text[1:] if c != "\ufffd")  # the answer is fixed (seeded model, greedy)
    cut = server.client.post("/v1/completions", json={**body, "stop": ["@@", stop]}).json()["choices"][0]
    assert cut["text"] == text[:text.find(stop)] and cut["finish_reason"] == "stop"
    sampled = {**body, "temperature": 1.0, "top_p": 0.9, "seed": 3, "return_token_ids": True}
    a = server.client.post("/v1/completions", json=sampled).json()["choices"][0]["token_ids"]
    b = server.client.post("/v1/completions", json=sampled).json()["choices"][0]["token_ids"]
    assert a == b and len(a) == 12
