"""Bad input and faults against the real server: each answered with a clear error, the server serving on."""
from __future__ import annotations

import json
import os
import threading
import time

import httpx
import pytest

from .conftest import ADAPTERS, Server, encode

OK = {"model": "lora4", "prompt": "hi", "max_tokens": 2, "temperature": 0}


def _error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


def test_unknown_adapter_is_404_listing_the_loaded_ones(server):
    error = _error(server.client.post("/v1/completions", json={**OK, "model": "nope"}), 404)
    assert "'nope'" in error["message"] and all(f"'{n}'" in error["message"] for n in ADAPTERS)
    assert error["param"] == "model"


@pytest.mark.parametrize("body, field", [
    ('{"model": "lora4", "prompt": ', None),                                   # malformed JSON
    ('["not", "an", "object"]', None),
    (json.dumps({**OK, "max_tokens": "2"}), "max_tokens"),
    (json.dumps({**OK, "max_tokens": 0}), "max_tokens"),
    (json.dumps({**OK, "temperature": "hot"}), "temperature"),
    (json.dumps({**OK, "top_p": 0}), "top_p"),
    (json.dumps({**OK, "stop": 5}), "stop"),
    (json.dumps({**OK, "seed": 1.5}), "seed"),
    (json.dumps({**OK, "stream": "yes"}), "stream"),
    (json.dumps({**OK, "prompt": None}), "prompt"),
    (json.dumps({**OK, "prompt": [1, -4]}), "prompt"),
    (json.dumps({k: v for k, v in OK.items() if k != "model"}), "model"),
])
def test_malformed_bodies_are_400_naming_the_field(server, body, field):
    error = _error(server.client.post("/v1/completions", content=body,
                                      headers={"content-type": "application/json"}), 400)
    assert error["param"] == field and (field is None or field in error["message"])
    if field is None:
        assert "JSON" in error["message"]


def test_chat_message_of_the_wrong_type_is_400(server):
    body = {"model": "lora4", "messages": [{"role": "user", "content": ["x"]}]}
    error = _error(server.client.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == "messages[0].content"


def test_prompt_longer_than_the_context_is_400(server):
    error = _error(server.client.post("/v1/completions", json={**OK, "prompt": "x" * 32800}), 400)
    assert "context of 32768" in error["message"] and error["param"] == "prompt"


def test_failed_adapter_loads_are_4xx_and_the_server_serves_on(server, served, tmp_path):
    missing = _error(server.client.post("/v1/adapters", json={"name": "x", "path": str(tmp_path / "none")}), 400)
    assert "could not load adapter 'x'" in missing["message"]
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    src = served["adapters"]["lora4"]
    (corrupt / "adapter_config.json").write_text(open(os.path.join(src, "adapter_config.json")).read())
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    _error(server.client.post("/v1/adapters", json={"name": "x", "path": str(corrupt)}), 400)
    other = tmp_path / "other"  # an adapter made for a model with other layer sizes
    from fastpeft.serve import tiny
    tiny.save_lora(tiny.build_model(hidden_size=32, intermediate_size=64, num_hidden_layers=2, head_dim=8),
                   str(other), "o", seed=1)
    wrong = _error(server.client.post("/v1/adapters", json={"name": "x", "path": str(other)}), 400)
    assert "shape" in wrong["message"]
    _error(server.client.post("/v1/adapters", json={"name": "lora4", "path": src}), 409)
    _error(server.client.post("/v1/adapters", json={"name": 3, "path": src}), 400)
    _error(server.client.delete("/v1/adapters/nope"), 404)
    assert server.alive() and {m["id"] for m in server.client.get("/v1/models").json()["data"]} == {"tiny", *ADAPTERS}
    assert server.client.post("/v1/completions", json=OK).status_code == 200


def test_hot_unload_and_load_while_serving(server, served, reference):
    prompt = {"model": "lora1", "prompt": "The keeper ", "max_tokens": 200, "temperature": 0, "ignore_eos": True,
              "return_token_ids": True}
    answers = {}

    def long_request():
        answers["during"] = server.client.post("/v1/completions", json=prompt)
    t = threading.Thread(target=long_request)
    t.start()
    while not server.client.get("/health").json()["in_flight"]:
        time.sleep(0.01)
    assert server.client.delete("/v1/adapters/lora1").json() == {"id": "lora1", "object": "model", "deleted": True}
    t.join()
    expected = reference(encode("The keeper "), "lora1", 200)
    got = answers["during"].json()["choices"][0]["token_ids"]  # finished on its own adapter, never another's
    assert got[:len(expected)] == expected
    _error(server.client.post("/v1/completions", json={**OK, "model": "lora1"}), 404)
    assert server.client.post("/v1/adapters", json={"name": "lora1", "path": served["adapters"]["lora1"]}).status_code \
        == 200
    again = server.client.post("/v1/completions", json=prompt).json()["choices"][0]["token_ids"]
    assert again == got


def test_client_disconnect_mid_stream_frees_its_slot(server):
    body = {**OK, "max_tokens": 30000, "ignore_eos": True, "stream": True, "prompt": "x"}  # would take minutes
    with httpx.Client(base_url=server.url, timeout=30) as c, c.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        next(lines)
        assert server.client.get("/health").json()["in_flight"] == 1
        time.sleep(0.3)
        assert server.client.get("/health").json()["in_flight"] == 1
    deadline = time.monotonic() + 10
    while server.client.get("/health").json()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.client.get("/health").json()["in_flight"] == 0


def test_queue_bound_answers_503(served):
    small = Server(served["model"], {"lora4": served["adapters"]["lora4"]}, "--max-queue", "2")
    try:
        body = {**OK, "max_tokens": 30000, "ignore_eos": True, "stream": True}  # they would take minutes
        with httpx.Client(base_url=small.url, timeout=30) as c1, httpx.Client(base_url=small.url, timeout=30) as c2, \
                c1.stream("POST", "/v1/completions", json=body) as r1, \
                c2.stream("POST", "/v1/completions", json=body) as r2:
            lines = r1.iter_lines(), r2.iter_lines()  # kept: a dropped iterator closes its stream
            next(lines[0]), next(lines[1])
            error = _error(small.client.post("/v1/completions", json=OK), 503)
            assert "2 requests" in error["message"] and "retry" in error["message"]
        deadline = time.monotonic() + 10
        while small.client.get("/health").json()["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert small.client.post("/v1/completions", json=OK).status_code == 200
    finally:
        small.stop()
