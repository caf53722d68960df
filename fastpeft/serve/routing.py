"""Per-token adapter routing on transformers' continuous batching, and the gate that keeps adapter changes between steps.

Each scheduler step packs the tokens of many requests (prefill chunks and decode tokens) into one (1, T) forward.
`StepRouter` wraps the manager's step: it reads which request owns each packed token (the step's requests, in order,
each `query_length` tokens; padding tokens own none), maps each request to its adapter's id, and runs the step inside
a per-token multi-adapter batch (fastpeft.modules.batch.RowBatch(per_token=True)), so every LoRA / DoRA / IA3 layer
gives each token its own request's adapter in one multi-adapter op. It also points the step's sampler at the
requests' SamplingParams.

`Gate`: steps and adapter changes (load, delete) exclude each other; a waiting change goes before the next step.
"""
from __future__ import annotations

import contextlib
import threading

import torch

from ..inject.state import get_state
from ..modules.batch import RowBatch
from . import compat
from .sampling import SamplingParams, Sampler

GREEDY = SamplingParams()


class Gate:
    """Steps run one at a time (the manager's thread); `exclusive()` waits for the step in progress to end and holds
    the next one back until the block ends (adapter loads and deletes). Changes run one at a time."""

    def __init__(self):
        self._cond = threading.Condition()
        self._changes = 0
        self._stepping = False
        self._serial = threading.Lock()

    @contextlib.contextmanager
    def step(self):
        with self._cond:
            while self._changes:
                self._cond.wait()
            self._stepping = True
        try:
            yield
        finally:
            with self._cond:
                self._stepping = False
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        with self._serial:
            with self._cond:
                self._changes += 1
                while self._stepping:
                    self._cond.wait()
            try:
                yield
            finally:
                with self._cond:
                    self._changes -= 1
                    self._cond.notify_all()


class StepRouter:
    """Installed on one ContinuousBatchingManager: routes every step's tokens to their requests' adapters.
    `lookup(request_id)` -> (adapter name or None, SamplingParams, cancelled) of a request the engine admitted."""

    def __init__(self, model, manager, gate: Gate, lookup):
        compat.check_manager(manager)
        self.model, self.manager, self.gate, self.lookup = model, manager, gate, lookup
        self.sampler = Sampler()
        self._step = manager._generation_step  # the bound method of this manager
        self._runner = None
        self._threads = torch.get_num_threads()  # the caller's intra-op threads, for the manager's thread too
        manager._generation_step = self.step  # an instance attribute: this manager only
        self.steps = 0

    def uninstall(self) -> None:
        if self.manager.__dict__.get("_generation_step") == self.step:
            del self.manager.__dict__["_generation_step"]

    def _attach_sampler(self) -> None:
        processor = self.manager.batch_processor
        compat.check_processor(processor)
        runner = processor.model_runner
        if runner is not self._runner:
            runner._sample = self.sampler  # per instance: this manager's runner only
            self._runner = runner
            # OpenMP gives a new thread as many threads as the host has cores, not the process's (cgroup) share:
            # oversubscribed, CPU ops of the step run 10-100x slower than on the caller's thread
            torch.set_num_threads(self._threads)

    def step(self) -> None:
        self._attach_sampler()
        io = self.manager.batch_processor.inputs_and_outputs
        with self.gate.step():  # adapters cannot change from here to the end of the forward
            state = get_state(self.model)
            ctx = state.batch if state is not None and state.configs else None
            slots, names, rows = [], [], []
            for future in io.requests_in_batch:
                adapter, params, cancelled = self.lookup(future.state.request_id)
                slot = -1 if adapter is None or ctx is None else ctx.ids.get(adapter, -1)
                if adapter is not None and slot < 0 and not cancelled:  # a cancelled one's output is dropped
                    raise RuntimeError(f"fastpeft serve: request {future.state.request_id} uses adapter {adapter!r}, "
                                       "which is no longer loaded; the engine unloads an adapter only after its "
                                       "requests end.")
                slots.extend([slot] * future.query_length)
                names.extend([adapter] * future.query_length)
                if future.has_new_token:
                    rows.append(params or GREEDY)
            padding = int(io.num_q_tokens) - len(slots)
            slots.extend([-1] * padding)
            names.extend([None] * padding)
            self.sampler.rows = rows
            self.steps += 1
            if ctx is None:
                return self._step()
            batch = RowBatch(tuple(slots), tuple(names), ctx.num_slots, per_token=True)
            with ctx.running(batch):
                return self._step()
