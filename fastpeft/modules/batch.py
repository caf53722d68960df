"""Multi-adapter batches at the module level: which adapter each row of the batch being run uses.

A model's adapter modules share one `BatchContext`: every adapter's integer id (its slot in each layer's tables,
stable while the adapter exists) and the `RowBatch` being run, if any. While a RowBatch is current, batch-aware
modules (LoRA, IA3, prefix tuning, LLaMA-Adapter) give each row its own adapter and ignore the active set; every
other module applies nothing (`running_adapters()` is empty), so a row sees its own adapter and nothing else.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import AdapterError
from ..ops.routing import Routing

ATTRIBUTE = "_fastpeft_batch"


class RowBatch:
    """The slot (adapter id) of each row of a batch, -1 for none; its routings, per token layout, built on first use
    and shared by every layer. `expand` allows a layer's batch to be a multiple of the rows (generate repeats each
    row for beams and return sequences, in order). With `per_token`, `slots` has one entry per token of every layer
    input instead (x.shape[:-1] flattened: the packed (1, T) batches of continuous batching, where the tokens of many
    requests share one row); only token-wise modules (LoRA, AdaLoRA, DoRA, IA3) can run such a batch."""

    def __init__(self, slots: tuple[int, ...], names: tuple[str | None, ...], num_slots: int, *, expand: bool = False,
                 per_token: bool = False):
        self.slots, self.names, self.num_slots, self.expand = slots, names, num_slots, expand
        self.per_token = per_token
        self.memo: dict = {}  # per-layer state for this batch (validated tables), keyed by the layer
        self._routings: dict = {}

    def routing(self, x: Tensor, where: str) -> Routing:
        """The routing of a layer input x: (B, ..., features) with B rows (or a multiple of them, when expanded)."""
        if self.per_token:
            return self._token_routing(x, where)
        rows = x.shape[0] if x.dim() >= 3 else len(self.slots)
        tokens = x.numel() // max(x.shape[-1], 1)
        key = (rows, tokens, x.device)
        found = self._routings.get(key)
        if found is None:
            found = self._routings[key] = Routing.build(self.row_slots(rows, where, tokens), self.num_slots,
                                                        x.device, tokens_per_slot=tokens // rows, where=where)
        return found

    def _token_routing(self, x: Tensor, where: str) -> Routing:
        tokens = x.numel() // max(x.shape[-1], 1)
        if tokens != len(self.slots):
            raise AdapterError(f"{where}: the per-token batch names {len(self.slots)} adapters, one per token, but this "
                               f"layer's input {tuple(x.shape)} has {tokens} tokens; pass one adapter per token.")
        found = self._routings.get(x.device)
        if found is None:
            found = self._routings[x.device] = Routing.build(self.slots, self.num_slots, x.device, where=where)
        return found

    def row_slots(self, rows: int, where: str, tokens: int | None = None) -> list[int]:
        """The slot of each of a layer's `rows` rows (`tokens` of them in all, a multiple of rows)."""
        return self._per_row(self.slots, rows, where, rows if tokens is None else tokens)

    def row_names(self, rows: int, where: str) -> list[str | None]:
        """The adapter name of each of a layer's `rows` rows (None: no adapter)."""
        return self._per_row(self.names, rows, where, rows)

    def _per_row(self, values: tuple, rows: int, where: str, tokens: int) -> list:
        if self.per_token:
            raise AdapterError(f"{where}: this module picks adapters per row (prefix tuning, LLaMA-Adapter, "
                               "modules_to_save), but the batch gives one adapter per token (packed continuous "
                               "batching); serve such adapters with model.generate(..., adapter_names=[...]) instead.")
        n = len(values)
        if rows == n and tokens % rows == 0:
            return list(values)
        if self.expand and rows % n == 0 and tokens % rows == 0:
            return [v for v in values for _ in range(rows // n)]
        raise AdapterError(f"{where}: the batch names {n} adapters (adapter_names / fp.adapter_batch), one per row, "
                           f"but this layer sees {rows} rows; pass one adapter name per row of the input.")

    @property
    def used(self) -> list[str]:
        return sorted({n for n in self.names if n is not None})


# The RowBatch each model's BatchContext runs, per thread and asyncio task (a context variable: two threads serving
# two batches on one model never see each other's, and asyncio.to_thread carries a task's batch to its worker).
_running: contextvars.ContextVar[dict] = contextvars.ContextVar("fastpeft_running_batches", default={})
_calls: contextvars.ContextVar[tuple] = contextvars.ContextVar("fastpeft_batch_calls", default=())
BASE = "__base__"  # PEFT's adapter name for a row without an adapter


class _Counter:
    """How many blocks are open anywhere (all threads): while none is, nothing reads the context variables, so that
    torch.compile traces a forward without a batch (it cannot trace ContextVar.get; with a batch running, the forward
    graph-breaks into the eager batch paths)."""

    def __init__(self):
        self.open = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {}  # a copy of a model (deepcopy, pickle) holds no open block, and a lock of its own

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    @contextlib.contextmanager
    def holding(self):
        with self._lock:
            self.open += 1
        try:
            yield
        finally:
            with self._lock:
                self.open -= 1


class BatchContext:
    """Adapter ids and the current batch of one model (shared by its adapter modules). `refused`: the adapters that
    cannot run in a multi-adapter batch, with their config's name."""

    def __init__(self):
        self.ids: dict[str, int] = {}
        self.refused: dict[str, str] = {}
        self._blocks = _Counter()

    @property
    def current(self) -> RowBatch | None:
        """The batch this thread (or task) runs on this model, or None."""
        return _running.get().get(self) if self._blocks.open else None

    @property
    def num_slots(self) -> int:
        return max(self.ids.values(), default=-1) + 1

    def assign(self, name: str, refused: str | None = None) -> int:
        """The lowest free id, for a new adapter (`refused`: its config's name, if it cannot run in batches)."""
        taken = set(self.ids.values())
        self.ids[name] = next(i for i in range(len(taken) + 1) if i not in taken)
        if refused is not None:
            self.refused[name] = refused
        return self.ids[name]

    def release(self, name: str) -> None:
        self.ids.pop(name, None)
        self.refused.pop(name, None)

    @contextlib.contextmanager
    def running(self, batch: RowBatch | None):
        """`batch` is current inside the block (None: no batch) for this thread; the previous one comes back after."""
        with self._blocks.holding():
            token = _running.set({**_running.get(), self: batch})
            try:
                yield batch
            finally:
                _running.reset(token)

    def make_batch(self, model: torch.nn.Module, adapters, *, expand: bool = False, per_token: bool = False,
                   where: str = "adapter_names") -> RowBatch:
        """The RowBatch of `adapters` (one per row: a name, None or "__base__", or an id, -1 for none; a sequence or a
        1-D integer tensor), everything checked before any layer runs. `per_token`: one per token instead."""
        names_of = {i: n for n, i in self.ids.items()}
        if isinstance(adapters, Tensor) or (isinstance(adapters, Sequence) and not isinstance(adapters, str) and
                                            adapters and all(isinstance(a, int) for a in adapters)):
            slots = _id_list(adapters, names_of, where)
            names = tuple(names_of.get(s) for s in slots)
        elif isinstance(adapters, Sequence) and not isinstance(adapters, str):
            names = tuple(None if a is None or a == BASE else a for a in adapters)
            unknown = [n for n in names if n is not None and n not in self.ids]
            if unknown:
                known = ", ".join(repr(n) for n in self.ids) or "none"
                raise AdapterError(f"{where}: no adapter named {unknown[0]!r} on this model (adapters: {known}).")
            slots = tuple(-1 if n is None else self.ids[n] for n in names)
        else:
            raise AdapterError(f"{where}: expected one adapter per row (a list of names, None or '__base__' for no "
                               f"adapter, or a 1-D tensor of ids from fp.adapter_ids), got {type(adapters).__name__}.")
        if not slots:
            raise AdapterError(f"{where}: the batch has no rows; pass one adapter per row.")
        for name in sorted({n for n in names if n is not None}):
            if name in self.refused:
                raise AdapterError(f"{where}: adapter {name!r} is a {self.refused[name]}; multi-adapter batches take "
                                   "LoRA, AdaLoRA, DoRA, IA3, prefix tuning and LLaMA-Adapter adapters. Run it in its "
                                   "own batch (fp.set_active_adapters).")
        merged = [path for path, m in model.named_modules() if getattr(m, "merged_adapters", None)]
        if merged:
            where_merged = merged[0] + (f" (and {len(merged) - 1} more)" if len(merged) > 1 else "")
            raise AdapterError(f"{where}: adapters are merged into the base weights of {where_merged}; a multi-adapter "
                               "batch needs them unmerged: call fp.unmerge_adapter(model) first.")
        return RowBatch(tuple(slots), names, self.num_slots, expand=expand, per_token=per_token)


def _id_list(adapters, names_of: dict[int, str], where: str) -> tuple[int, ...]:
    if isinstance(adapters, Tensor):
        if adapters.dim() != 1 or adapters.dtype.is_floating_point or adapters.dtype == torch.bool:
            raise AdapterError(f"{where}: expected a 1-D integer tensor of adapter ids, got {adapters.dtype} of shape "
                               f"{tuple(adapters.shape)}.")
        if adapters.device.type == "meta":
            raise AdapterError(f"{where}: the adapter ids are a meta tensor, which holds no values; pass them on the "
                               "CPU (a CPU tensor also avoids a device synchronisation) or on the model's device.")
        adapters = adapters.tolist()
    bad = [(i, s) for i, s in enumerate(adapters) if s != -1 and s not in names_of]
    if bad:
        i, s = bad[0]
        known = ", ".join(f"{n}={i}" for i, n in sorted(names_of.items())) or "none"
        raise AdapterError(f"{where}: adapter id {s} at row {i} names no adapter (ids: {known}; -1 for none).")
    return tuple(int(s) for s in adapters)


class NamedRows:
    """What lets a model take adapter_names= in forward and generate: a forward pre-hook that makes the names' batch
    current for the call (a forward hook, which runs even when the call fails, ends it), and a generate that keeps it
    current for the whole generation, each row repeated as generate repeats it (beams, return sequences)."""

    def __init__(self, ctx: BatchContext, model: torch.nn.Module):
        self.ctx, self.model = ctx, model
        self._calls = _Counter()

    def pre_forward(self, model, args, kwargs):
        names = kwargs.pop("adapter_names", None)
        if names is not None:
            if torch.compiler.is_compiling():  # a clear message under fullgraph=True; else a graph break into eager
                torch._dynamo.graph_break(msg=EAGER_ONLY)
            _check_rows(names, _input_rows(args, kwargs), "adapter_names")
            batch = self.ctx.make_batch(model, names)
            calls, runner = self._calls.holding(), self.ctx.running(batch)
            calls.__enter__()
            runner.__enter__()
            _calls.set(_calls.get() + ((kwargs, calls, runner),))  # this call's: post_forward knows it by its kwargs
        return args, kwargs

    def post_forward(self, model, args, kwargs, output):
        """Ends the batch of this call's adapter_names (also when the call failed: the hook always runs)."""
        if not self._calls.open:
            return
        calls = _calls.get()
        if calls and calls[-1][0] is kwargs:
            _calls.set(calls[:-1])
            _, counted, runner = calls[-1]
            runner.__exit__(None, None, None)
            counted.__exit__(None, None, None)

    def generate(self, *args, adapter_names=None, **kwargs):
        """generate(..., adapter_names=[one per input row]): beams and return sequences repeat each row's adapter."""
        generate = type(self.model).generate
        if adapter_names is None:
            return generate(self.model, *args, **kwargs)
        _check_rows(adapter_names, _input_rows(args, kwargs) or 1, "generate(adapter_names=...)")
        with self.ctx.running(self.ctx.make_batch(self.model, adapter_names, expand=True, where="adapter_batch")):
            return generate(self.model, *args, **kwargs)


EAGER_ONLY = ("adapter_names: multi-adapter batches run eagerly (their routing is host data built per batch); call "
              "the model uncompiled, or compile it with torch.compile(model, fullgraph=False), which runs the batch "
              "paths eagerly")


_INPUTS = ("input_ids", "inputs_embeds", "input_features", "pixel_values")


def _input_rows(args: tuple, kwargs: dict) -> int | None:
    """The batch size of a model call's inputs (None when it has none: generate then starts from one BOS row)."""
    for value in (*(kwargs.get(k) for k in _INPUTS), *args[:1]):
        if isinstance(value, Tensor) and value.dim() >= 1:
            return value.shape[0]
    return None


def _check_rows(names, rows: int | None, where: str) -> None:
    """One adapter per input row, checked on the host before the model runs (beams and num_return_sequences repeat
    rows later, inside generate)."""
    count = None  # make_batch explains anything that is not a sequence or a 1-D tensor
    if isinstance(names, Tensor):
        count = names.shape[0] if names.dim() == 1 else None
    elif isinstance(names, Sequence) and not isinstance(names, str):
        count = len(names)
    if rows is not None and count is not None and count != rows:
        raise AdapterError(f"{where}: {count} adapter name(s) for {rows} input row(s); pass one per row (None or "
                           "'__base__' for a row without an adapter).")


def context_of(module: torch.nn.Module) -> BatchContext | None:
    return module.__dict__.get(ATTRIBUTE)


def current_batch(module: torch.nn.Module) -> RowBatch | None:
    """The RowBatch being run by the model this adapter module belongs to, or None."""
    ctx = module.__dict__.get(ATTRIBUTE)
    return None if ctx is None else ctx.current


class SlotTables:
    """One layer's adapters laid out by slot (adapter id) for a multi-adapter op (a LoRABank, an IA3Bank), kept
    between batches. A batch checks it once, on first use: it is rebuilt when an adapter the batch uses changed
    (its tensors moved, were replaced, or its id changed); adding or deleting an adapter on the layer drops it."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.bank, self.mine, self.sources = None, None, {}

    def get(self, layer, batch: RowBatch, source, build) -> tuple[object, dict[int, str], list[str]]:
        """(bank, {slot: name} of the layer's adapters, the names of them the batch uses), once per batch.
        source(name) -> a tuple that changes when the adapter's tensors do; build({slot: name}) -> the bank."""
        found = batch.memo.get(layer)
        if found is not None:
            return found
        if self.mine is None:  # ids of a layer's adapters change only when one of them is added or deleted
            ctx = context_of(layer)
            self.mine = {ctx.ids[n]: n for n in layer.adapter_names if n in ctx.ids}
        used = [self.mine[s] for s in sorted(set(batch.slots)) if s in self.mine]  # O(rows), not O(adapters)
        if self.bank is None or any(self.sources.get(n) != source(n) for n in used):
            self.bank = build(self.mine)
            self.sources = {n: source(n) for n in self.mine.values()}
        batch.memo[layer] = found = (self.bank, self.mine, used)
        return found


def row_names(container, batch: RowBatch, rows: int) -> list[str | None]:
    """The adapter name of each of `rows` rows for an adapter module (None: no adapter, or not one of its own)."""
    own = set(container.adapter_names)
    return [n if n in own else None for n in batch.row_names(rows, type(container).__name__)]


def no_adapters(container) -> RowBatch:
    """A batch whose rows (any number) use no adapter: modules run under it compute their base layers."""
    return RowBatch((-1,), (None,), context_of(container).num_slots, expand=True)
