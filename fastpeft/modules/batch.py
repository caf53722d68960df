"""Multi-adapter batches at the module level: which adapter each row of the batch being run uses.

A model's adapter modules share one `BatchContext`: every adapter's integer id (its slot in each layer's tables,
stable while the adapter exists) and the `RowBatch` being run, if any. While a RowBatch is current, batch-aware
modules (LoRA, IA3, prefix tuning, LLaMA-Adapter) give each row its own adapter and ignore the active set; every
other module applies nothing (`running_adapters()` is empty), so a row sees its own adapter and nothing else.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from ..errors import AdapterError
from ..ops.routing import Routing

ATTRIBUTE = "_fastpeft_batch"


class RowBatch:
    """The slot (adapter id) of each row of a batch, -1 for none; its routings, per token layout, built on first use
    and shared by every layer. `expand` allows a layer's batch to be a multiple of the rows (generate repeats each
    row for beams and return sequences, in order)."""

    def __init__(self, slots: tuple[int, ...], names: tuple[str | None, ...], num_slots: int, *, expand: bool = False):
        self.slots, self.names, self.num_slots, self.expand = slots, names, num_slots, expand
        self.memo: dict = {}  # per-layer state for this batch (validated tables), keyed by the layer
        self._routings: dict = {}

    def routing(self, x: Tensor, where: str) -> Routing:
        """The routing of a layer input x: (B, ..., features) with B rows (or a multiple of them, when expanded)."""
        rows = x.shape[0] if x.dim() >= 3 else len(self.slots)
        tokens = x.numel() // max(x.shape[-1], 1)
        key = (rows, tokens, x.device)
        found = self._routings.get(key)
        if found is None:
            found = self._routings[key] = Routing.build(self._row_slots(rows, tokens, where), self.num_slots,
                                                        x.device, tokens_per_slot=tokens // rows, where=where)
        return found

    def _row_slots(self, rows: int, tokens: int, where: str) -> list[int]:
        n = len(self.slots)
        if rows == n and tokens % rows == 0:
            return list(self.slots)
        if self.expand and rows % n == 0 and tokens % rows == 0:
            return [s for s in self.slots for _ in range(rows // n)]
        raise AdapterError(f"{where}: the batch names {n} adapters (adapter_names / fp.adapter_batch), one per row, "
                           f"but this layer sees {rows} rows; pass one adapter name per row of the input.")

    @property
    def used(self) -> list[str]:
        return sorted({n for n in self.names if n is not None})


class BatchContext:
    """Adapter ids and the current batch of one model (shared by its adapter modules)."""

    def __init__(self):
        self.ids: dict[str, int] = {}
        self.current: RowBatch | None = None

    @property
    def num_slots(self) -> int:
        return max(self.ids.values(), default=-1) + 1

    def assign(self, name: str) -> int:
        """The lowest free id, for a new adapter."""
        taken = set(self.ids.values())
        self.ids[name] = next(i for i in range(len(taken) + 1) if i not in taken)
        return self.ids[name]

    def release(self, name: str) -> None:
        self.ids.pop(name, None)

    def name_of(self, slot: int) -> str | None:
        return next((n for n, i in self.ids.items() if i == slot), None)

    @contextlib.contextmanager
    def running(self, batch: RowBatch | None):
        """`batch` is current inside the block (None: no batch); the previous one comes back after."""
        previous, self.current = self.current, batch
        try:
            yield batch
        finally:
            self.current = previous


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
        self.bank = None
        self.sources: dict[str, tuple] = {}

    def clear(self) -> None:
        self.bank, self.sources = None, {}

    def get(self, layer, batch: RowBatch, source, build) -> tuple[object, dict[int, str], list[str]]:
        """(bank, {slot: name} of the layer's adapters, the names of them the batch uses), once per batch.
        source(name) -> a tuple that changes when the adapter's tensors do; build({slot: name}) -> the bank."""
        found = batch.memo.get(layer)
        if found is not None:
            return found
        ctx = context_of(layer)
        mine = {ctx.ids[n]: n for n in layer.adapter_names if n in ctx.ids}
        used = [mine[s] for s in sorted(set(batch.slots)) if s in mine]
        if self.bank is None or any(self.sources.get(n) != source(n) for n in used):
            self.bank = build(mine)
            self.sources = {n: source(n) for n in mine.values()}
        batch.memo[layer] = found = (self.bank, mine, used)
        return found


def row_names(container, batch: RowBatch, rows: int) -> list[str | None]:
    """The adapter name of each of `rows` rows for an adapter module (None: no adapter, or not one of its own)."""
    ctx = context_of(container)
    names = [ctx.name_of(s) if s >= 0 else None for s in batch._row_slots(rows, rows, type(container).__name__)]
    return [n if n in container.adapter_names else None for n in names]


def no_adapters(container) -> RowBatch:
    """A batch whose rows (any number) use no adapter: modules run under it compute their base layers."""
    return RowBatch((-1,), (None,), context_of(container).num_slots, expand=True)
