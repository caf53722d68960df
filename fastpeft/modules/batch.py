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
            found = self._routings[key] = Routing.build(self.row_slots(rows, where, tokens), self.num_slots,
                                                        x.device, tokens_per_slot=tokens // rows, where=where)
        return found

    def row_slots(self, rows: int, where: str, tokens: int | None = None) -> list[int]:
        """The slot of each of a layer's `rows` rows (`tokens` of them in all, a multiple of rows)."""
        return self._per_row(self.slots, rows, where, rows if tokens is None else tokens)

    def row_names(self, rows: int, where: str) -> list[str | None]:
        """The adapter name of each of a layer's `rows` rows (None: no adapter)."""
        return self._per_row(self.names, rows, where, rows)

    def _per_row(self, values: tuple, rows: int, where: str, tokens: int) -> list:
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
