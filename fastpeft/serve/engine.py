"""The serving engine: many adapters on one model, on transformers' continuous-batching manager.

    engine = Engine(model)                          # model: a causal LM with fastpeft adapters (or none yet)
    engine.start()
    rid = engine.submit(prompt_ids, "math", SamplingParams(max_tokens=32), on_output)   # None / "__base__": no adapter
    engine.load_adapter("chat", "path/to/adapter"); engine.unload_adapter("math")
    engine.close()

Requests join and leave at every scheduler step; each step's packed tokens run with their own request's adapter
(routing.py). `on_output(Output)` is called on the engine's dispatcher thread with the tokens generated so far,
after every new token, and once with finished=True (or an error). Admission is checked before anything is queued:
an unknown adapter, a prompt that does not fit the model's context, a full queue or a dead engine raise `Rejected`
(with the HTTP status a server should answer). Loading and unloading happen between steps (routing.Gate); an adapter
being unloaded takes no new request, and is deleted once its requests have ended (those still running after
`drain_timeout` seconds end with an error), never while a step uses it.
"""
from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..inject import delete_adapter
from ..inject.state import get_state
from ..checkpoint import load_adapter
from . import compat
from .routing import Gate, StepRouter
from .sampling import SamplingParams

BASE = "__base__"
SERVABLE = {"lora", "adalora", "ia3"}  # methods a packed (per-token) multi-adapter batch carries


class Rejected(compat.ServeError):
    """A request or an adapter change the engine refuses; `status` is the HTTP status a server answers with."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


@dataclass
class Output:
    request_id: str
    tokens: list[int]          # every token generated so far
    finished: bool
    error: str | None = None


@dataclass
class _Record:
    adapter: str | None
    params: SamplingParams
    on_output: Callable[[Output], None]
    cancelled_at: int | None = None  # the step count when it was cancelled


class Engine:
    """One continuous-batching manager on `model`, with per-token adapter routing. Sizes: `max_batch_tokens` tokens
    per step; `kv_cache_tokens` tokens of paged KV cache in all; `max_queue` requests admitted at once (more: 503)."""

    def __init__(self, model, *, max_batch_tokens: int | None = None, kv_cache_tokens: int | None = None,
                 page_size: int = 16, max_queue: int = 256, eos_token_id=None, drain_timeout: float = 60.0):
        compat.check_model(model)
        merged = [path for path, m in model.named_modules() if getattr(m, "merged_adapters", None)]
        if merged:
            raise compat.ServeError(f"Engine: adapters are merged into {merged[0]} (and {len(merged) - 1} more "
                                    "layers); the engine routes unmerged adapters per token: call "
                                    "fp.unmerge_adapter(model) first.")
        state = get_state(model)
        for name, config in (state.configs.items() if state is not None else ()):
            self._check_servable(name, config, state)
        self.model = model
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.max_context = int(getattr(text, "max_position_embeddings", 0) or 2048)
        cpu = next(model.parameters()).device.type == "cpu"
        if max_batch_tokens is None and cpu:
            max_batch_tokens = 256
        if kv_cache_tokens is None and cpu:
            kv_cache_tokens = min(self.max_context * 16, 1 << 16)
        num_blocks = None if kv_cache_tokens is None else max(2, math.ceil(kv_cache_tokens / page_size))
        if eos_token_id is None:
            eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
            eos_token_id = getattr(text, "eos_token_id", None) if eos_token_id is None else eos_token_id
        self.eos_token_id = -1 if eos_token_id is None else eos_token_id
        self.max_queue, self.drain_timeout = max_queue, drain_timeout
        self._cb_config = compat.cb_config(
            page_size=page_size, num_blocks=num_blocks, max_batch_tokens=max_batch_tokens,
            allow_block_sharing=False,  # prefix sharing would reuse one adapter's KV cache for another's request
            use_async_batching=False,   # the step's requests are read from the synchronous IO
            use_cuda_graph=False,       # the per-token routing is host data built per step
            max_queue_size=0, return_logprobs=False)
        self.gate = Gate()
        self._records: dict[str, _Record] = {}
        self._draining: set[str] = set()
        self._cond = threading.Condition()
        self._ids = itertools.count()
        self._manager = self._router = self._dispatcher = None
        self._closing = False
        self.error: str | None = None

    # ------------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> Engine:
        from transformers import GenerationConfig

        generation = GenerationConfig(do_sample=False, max_new_tokens=16, eos_token_id=self.eos_token_id)
        self._manager = self.model.init_continuous_batching(generation_config=generation,
                                                            continuous_batching_config=self._cb_config)
        self._router = StepRouter(self.model, self._manager, self.gate, self._lookup)
        self._manager.start()
        self._dispatcher = threading.Thread(target=self._dispatch, name="fastpeft-serve-dispatch", daemon=True)
        self._dispatcher.start()
        return self

    def close(self) -> None:
        """Stop the manager (requests still running end with an error) and give the model back as it was."""
        self._closing = True
        if self._manager is not None:
            with self._cond:
                running = list(self._records)
            for rid in running:  # stop() would otherwise finish every request first
                self._manager.cancel_request(rid)
            try:
                self._manager.stop(block=True, timeout=10)
            finally:
                self._router.uninstall()
        if self._dispatcher is not None:
            self._dispatcher.join(timeout=5)
        with self._cond:
            records, self._records = self._records, {}
        for rid, record in records.items():
            if record.cancelled_at is None:
                record.on_output(Output(rid, [], True, "the server is shutting down"))

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def healthy(self) -> bool:
        if self.error is None and self._manager is not None:
            fatal = getattr(getattr(self._manager, "background_thread_status", None), "fatal_error", None)
            if fatal is not None or not self._manager.is_running():
                self.error = f"the generation loop stopped: {fatal or 'not running'}"
        return self.error is None and self._manager is not None

    @property
    def adapters(self) -> list[str]:
        """The loaded adapters that take requests (not those being unloaded)."""
        state = get_state(self.model)
        return [n for n in (state.configs if state is not None else ()) if n not in self._draining]

    @property
    def in_flight(self) -> int:
        with self._cond:
            return sum(r.cancelled_at is None for r in self._records.values())

    # ------------------------------------------------------------------------------------------------ requests
    def submit(self, prompt_ids: list[int], adapter: str | None, params: SamplingParams,
               on_output: Callable[[Output], None], *, ignore_eos: bool = False) -> str:
        """Queue one request; returns its id. Raises Rejected (nothing queued) when it cannot be served. With
        `ignore_eos`, it generates exactly params.max_tokens tokens."""
        adapter = None if adapter in (None, BASE) else adapter
        if not self.healthy:
            raise Rejected(503, f"the engine is not running ({self.error or 'not started'}); restart the server.")
        if not prompt_ids:
            raise Rejected(400, "the prompt is empty; send at least one token.", "prompt")
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_context:
            raise Rejected(400, f"the prompt has {len(prompt_ids)} tokens and max_tokens is {params.max_tokens}: "
                                f"{total} tokens, more than the model's context of {self.max_context}; shorten the "
                                "prompt or lower max_tokens.", "prompt")
        with self._cond:
            if adapter is not None and adapter not in self.adapters:
                raise Rejected(404, self.unknown(adapter), "model")
            self._prune()
            if sum(r.cancelled_at is None for r in self._records.values()) >= self.max_queue:
                raise Rejected(503, f"the server already holds {self.max_queue} requests (--max-queue); retry later.")
            rid = f"fp-{next(self._ids)}"
            self._records[rid] = _Record(adapter, params, on_output)
        try:
            self._manager.add_request(list(prompt_ids), request_id=rid, max_new_tokens=params.max_tokens,
                                      streaming=True, eos_token_id=-1 if ignore_eos else self.eos_token_id)
        except Exception as exc:
            with self._cond:
                self._records.pop(rid, None)
                self._cond.notify_all()
            raise Rejected(503, f"the engine did not take the request: {exc}") from exc
        return rid

    def cancel(self, request_id: str) -> None:
        """End a request now (a client that went away): its slot and KV cache are freed at the next step."""
        with self._cond:
            record = self._records.get(request_id)
            if record is None or record.cancelled_at is not None:
                return
            record.cancelled_at = self._router.steps
            self._cond.notify_all()
        self._manager.cancel_request(request_id)

    def unknown(self, adapter: str) -> str:
        loaded = ", ".join(repr(n) for n in self.adapters) or "none"
        return (f"no adapter named {adapter!r} is loaded (loaded: {loaded}); use one of them, the base model's name or "
                f"'{BASE}' for no adapter, or load it with POST /v1/adapters.")

    def _lookup(self, request_id: str):
        record = self._records.get(request_id)
        if record is None:
            return None, None, True
        return record.adapter, record.params, record.cancelled_at is not None

    def _prune(self) -> None:
        """Forget cancelled requests the manager has dropped (a cancellation takes effect at the next step)."""
        steps = self._router.steps
        for rid in [r for r, rec in self._records.items() if rec.cancelled_at is not None and rec.cancelled_at + 2 < steps]:
            del self._records[rid]

    def _dispatch(self) -> None:
        """Hand each output of the manager to its request's callback (the dispatcher thread)."""
        while not self._closing:
            result = self._manager.get_result(timeout=0.1)
            if result is None:
                if not self.healthy:
                    self._fail_all(self.error)
                    time.sleep(0.05)
                continue
            with self._cond:
                record = self._records.get(result.request_id)
                if record is None or record.cancelled_at is not None:
                    continue
                finished = result.is_finished() or result.error is not None
                if finished:
                    del self._records[result.request_id]
                    self._cond.notify_all()
            try:
                record.on_output(Output(result.request_id, list(result.generated_tokens), finished, result.error))
            except Exception:  # a callback's failure is its request's business, never the engine's
                self.cancel(result.request_id)

    def _fail_all(self, error: str) -> None:
        with self._cond:
            records = [(rid, r) for rid, r in self._records.items() if r.cancelled_at is None]
            self._records.clear()
            self._cond.notify_all()
        for rid, record in records:
            record.on_output(Output(rid, [], True, error))

    # ------------------------------------------------------------------------------------------------ adapters
    def load_adapter(self, name: str, path: str) -> None:
        """Load the adapter at `path` (fastpeft, PEFT or AdapterHub format) as `name`, between two steps."""
        if not isinstance(name, str) or not name or name == BASE or "/" in name:
            raise Rejected(400, f"adapter name {name!r} is not usable; pass a non-empty name without '/', other than "
                                f"'{BASE}'.", "name")
        state = get_state(self.model)
        if state is not None and name in state.configs:
            raise Rejected(409, f"an adapter named {name!r} is already loaded; DELETE /v1/adapters/{name} first or "
                                "pick another name.", "name")
        from ..errors import FastPEFTError

        with self.gate.exclusive():
            try:
                load_adapter(self.model, path, name=name)
            except (FastPEFTError, OSError, ValueError) as exc:
                raise Rejected(400, f"could not load adapter {name!r} from {path!r}: {exc}", "path") from exc
            state = get_state(self.model)
            try:
                self._check_servable(name, state.configs[name], state)
            except Rejected:
                delete_adapter(self.model, name)
                raise
            self.model.eval()  # the new adapter's modules run in inference mode (no dropout)

    def unload_adapter(self, name: str) -> None:
        """Delete adapter `name` once its requests have ended; it takes no new request from now on."""
        with self._cond:
            if name not in self.adapters:
                raise Rejected(404, self.unknown(name), "name")
            self._draining.add(name)
            try:
                deadline = time.monotonic() + self.drain_timeout
                while self._live(name) and time.monotonic() < deadline:
                    self._cond.wait(timeout=0.1)
                late = self._live(name)
            except BaseException:
                self._draining.discard(name)
                raise
        try:
            for rid in late:
                record = self._records.get(rid)
                self.cancel(rid)
                if record is not None:
                    record.on_output(Output(rid, [], True, f"adapter {name!r} was unloaded before this request ended"))
            with self.gate.exclusive():
                delete_adapter(self.model, name)
        finally:
            with self._cond:
                self._draining.discard(name)

    def _live(self, name: str) -> list[str]:
        return [rid for rid, r in self._records.items() if r.adapter == name and r.cancelled_at is None]

    @staticmethod
    def _check_servable(name: str, config, state) -> None:
        method = getattr(config, "method", type(config).__name__)
        if method not in SERVABLE:
            raise Rejected(422, f"adapter {name!r} is a {type(config).__name__}: a continuous batch packs the tokens "
                                "of many requests into one sequence, where per-request prefixes (prefix tuning, "
                                "LLaMA-Adapter) and other non-token-wise methods cannot be kept apart. Serve LoRA "
                                "(any rank, rsLoRA, DoRA), AdaLoRA or IA3 adapters, or run this one offline with "
                                "model.generate(..., adapter_names=[...]).", "path")
        if state.saved.get(name):
            raise Rejected(422, f"adapter {name!r} has modules_to_save ({', '.join(state.saved[name])}), whole-module "
                                "copies that a packed multi-adapter step cannot route per token; serve an adapter "
                                "without modules_to_save.", "path")
