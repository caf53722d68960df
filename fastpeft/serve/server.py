"""The OpenAI-compatible HTTP server of `fastpeft serve` (FastAPI + uvicorn: the `serve` extra).

    POST /v1/completions, /v1/chat/completions   `model`: an adapter's name, or the base model's name or "__base__"
                                                 for none; max_tokens, temperature, top_p, stop, seed, stream (SSE)
    GET  /v1/models                              the base model and every loaded adapter
    POST /v1/adapters {"name", "path"}           load an adapter while serving; DELETE /v1/adapters/NAME unloads it
    GET  /health                                 {"status", "in_flight", "adapters"}

Errors are OpenAI-style JSON ({"error": {"message", "type", "param", "code"}}): 400 for a malformed body (naming the
field) or a prompt longer than the context, 404 for an unknown adapter (listing the loaded ones), 503 when the queue
is full or the engine stopped. A client that goes away mid-request has its request cancelled (slot and cache freed).
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .engine import BASE, Engine, Output, Rejected
from .protocol import AdapterRequest, BadRequest, ChatRequest, CompletionRequest, parse
from .sampling import SamplingParams
from .text import TextStream


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = {404: "not_found_error", 503: "service_unavailable"}.get(status, "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


def create_app(engine: Engine, tokenizer, base_name: str) -> FastAPI:
    """The app serving `engine` (already started); `base_name` is the base model's id in requests and /v1/models."""
    app = FastAPI(title="fastpeft serve")
    created = int(time.time())
    eos = engine.eos_token_id if isinstance(engine.eos_token_id, list) else [engine.eos_token_id]

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest):
        return error_response(exc.status, exc.message, exc.param)

    @app.exception_handler(Rejected)
    async def rejected(request: Request, exc: Rejected):
        return error_response(exc.status, exc.message, exc.field)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):  # never a crash: the request fails, the server goes on
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    def adapter_of(model: str) -> str | None:
        if model in (base_name, BASE):
            return None
        if model not in engine.adapters:
            raise Rejected(404, engine.unknown(model).replace("no adapter named", f"no model (base: {base_name!r}) "
                                                              "or adapter named"), "model")
        return model

    def card(name: str, parent: str | None) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "fastpeft", "root": name,
                "parent": parent}

    @app.get("/health")
    async def health():
        status = 200 if engine.healthy else 503
        return JSONResponse({"status": "ok" if status == 200 else engine.error, "in_flight": engine.in_flight,
                             "adapters": engine.adapters}, status)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card(base_name, None)] + [card(n, base_name) for n in engine.adapters]}

    @app.post("/v1/adapters")
    async def load(request: Request):
        body = parse(AdapterRequest, await request.body())
        await asyncio.to_thread(engine.load_adapter, body.name, body.path)
        return card(body.name, base_name)

    @app.delete("/v1/adapters/{name}")
    async def unload(name: str):
        await asyncio.to_thread(engine.unload_adapter, name)
        return {"id": name, "object": "model", "deleted": True}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = parse(CompletionRequest, await request.body())
        prompt = body.prompt
        if isinstance(prompt, str):
            prompt = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        elif any(t < 0 or t >= len(tokenizer) for t in prompt):
            raise BadRequest(400, f"prompt: token ids must be in 0..{len(tokenizer) - 1}.", "prompt")
        return await generate(request, body, prompt, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = parse(ChatRequest, await request.body())
        if not getattr(tokenizer, "chat_template", None):
            raise BadRequest(400, f"model {base_name!r} has no chat template; use /v1/completions.", "messages")
        text = tokenizer.apply_chat_template([m.model_dump() for m in body.messages], tokenize=False,
                                             add_generation_prompt=True)
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        if body.max_completion_tokens is not None and body.max_tokens is None:
            body.max_tokens = body.max_completion_tokens
        return await generate(request, body, prompt, chat=True)

    async def generate(request: Request, body, prompt: list[int], chat: bool):
        adapter = adapter_of(body.model)
        stops = body.stops()
        max_tokens = body.max_tokens if body.max_tokens is not None else min(16 if not chat else 256, max(
            1, engine.max_context - len(prompt)))
        params = SamplingParams(max_tokens=max_tokens, temperature=float(body.temperature), top_p=float(body.top_p),
                                seed=body.seed)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Output] = asyncio.Queue()
        rid = engine.submit(prompt, adapter, params, lambda out: loop.call_soon_threadsafe(queue.put_nowait, out),
                            ignore_eos=body.ignore_eos)
        text = TextStream(tokenizer, stops, set() if body.ignore_eos else set(eos))
        reply = Reply(rid, body.model, chat, len(prompt), body.return_token_ids)
        if body.stream:
            return StreamingResponse(stream(request, queue, text, reply, max_tokens), media_type="text/event-stream")
        pieces, output = [], None
        async for output, delta in outputs(request, queue, text, rid):
            pieces.append(delta)
        if output is None or output.error:
            return error_response(500, f"generation failed: {output.error if output else 'the client went away'}")
        return reply.whole("".join(pieces), text.finish_reason(max_tokens), text.tokens)

    async def outputs(request: Request, queue: asyncio.Queue, text: TextStream, rid: str):
        """(output, new text) until the request ends; cancels it when the client goes away or a stop string shows."""
        done = False
        try:
            while True:
                try:
                    output = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                delta = "" if output.error else text.update(output.tokens, output.finished)
                done = output.finished or text.stopped
                yield output, delta
                if done:
                    return
        finally:
            if not done:
                engine.cancel(rid)
            elif text.stopped and not output.finished:
                engine.cancel(rid)

    async def stream(request: Request, queue: asyncio.Queue, text: TextStream, reply, max_tokens: int):
        first = True
        async for output, delta in outputs(request, queue, text, reply.id):
            if output.error:
                yield sse({"error": {"message": f"generation failed: {output.error}", "type": "server_error",
                                     "param": None, "code": 500}})
                break
            finished = output.finished or text.stopped
            if delta or first or finished:
                yield sse(reply.chunk(delta, text.finish_reason(max_tokens) if finished else None, first,
                                      text.tokens))
                first = False
        yield "data: [DONE]\n\n"

    return app


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class Reply:
    """The OpenAI response objects of one request (completion or chat, whole or streamed chunks)."""

    def __init__(self, rid: str, model: str, chat: bool, prompt_tokens: int, token_ids: bool = False):
        self.id, self.token_ids, self.sent = rid, token_ids, 0
        self.public_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.model, self.chat, self.prompt_tokens = model, chat, prompt_tokens
        self.created = int(time.time())

    def _head(self, kind: str) -> dict:
        return {"id": self.public_id, "object": kind, "created": self.created, "model": self.model}

    def whole(self, text: str, finish_reason: str, tokens: list[int]) -> dict:
        usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(tokens),
                 "total_tokens": self.prompt_tokens + len(tokens)}
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        if self.token_ids:
            choice["token_ids"] = list(tokens)
        return {**self._head("chat.completion" if self.chat else "text_completion"), "choices": [choice],
                "usage": usage}

    def chunk(self, delta: str, finish_reason: str | None, first: bool, tokens: list[int]) -> dict:
        if self.chat:
            content = {"role": "assistant", "content": delta} if first else {"content": delta}
            choice = {"index": 0, "delta": content, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish_reason}
        if self.token_ids:  # the tokens generated since the previous chunk
            choice["token_ids"], self.sent = list(tokens[self.sent:]), len(tokens)
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}
