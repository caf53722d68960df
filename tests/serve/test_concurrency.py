"""32 simultaneous requests over 8 adapters (and the base model) on one server: every greedy answer equals offline
generate for its prompt with only its adapter active."""
from __future__ import annotations

import asyncio

import httpx

from .conftest import ADAPTERS, encode


def test_32_concurrent_requests_over_8_adapters_are_isolated(server, reference):
    names = list(ADAPTERS)
    jobs = [(f"request {i}: {'abcdefgh'[:1 + i % 8]}", names[i % 8], 4 + i % 5) for i in range(32)]
    jobs += [("base row", "tiny", 6), ("base row 2", "__base__", 5)]

    async def ask(client, prompt, model, n):
        r = await client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": n,
                                                       "temperature": 0, "return_token_ids": True})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["token_ids"]

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120,
                                     limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.gather(*(ask(client, *job) for job in jobs))

    answers = asyncio.run(main())
    for (prompt, model, n), got in zip(jobs, answers):
        assert got == reference(encode(prompt), None if model == "tiny" else model, n), (prompt, model)
