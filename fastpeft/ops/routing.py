"""Multi-adapter batches: which adapter each token uses (`Routing`), and the pointer tables kernels read adapters by.

A batch whose rows use different adapters is described once per forward and shared by every layer:

    token_slot[m]   the adapter slot of token m, or -1 (none: the base layer alone)
    order           the adapted tokens grouped by slot, in a stable order (token indices)
    seg_start       segment i = order[seg_start[i] : seg_start[i + 1]], every token of slot seg_slot[i]

Kernels take the segment form for prefill-sized inputs (tokens of one adapter share its tiles) and token_slot for
decode (gathered per token). Tokens without an adapter are in no segment: they cost the adapter kernels nothing.
The device tensors come from one host-to-device copy; the host copies (`seg_start_host`, ...) let launchers size
grids without synchronising. A slot indexes a layer's adapters (`pointer_table`): a slot that a layer does not
hold (past its table, or an empty entry) leaves that layer's output to the base layer.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import AdapterError


@dataclass(frozen=True, eq=False)
class Routing:
    token_slot: Tensor                 # (M,) int32 on the device
    order: Tensor                      # (M_adapted,) int32 on the device
    seg_start: Tensor                  # (S + 1,) int32 on the device
    seg_slot: Tensor                   # (S,) int32 on the device
    seg_start_host: tuple[int, ...]
    seg_slot_host: tuple[int, ...]
    order_host: Tensor                 # (M_adapted,) int64 on the CPU (the reference path indexes with it)

    @property
    def num_tokens(self) -> int:
        return self.token_slot.shape[0]

    @property
    def num_segments(self) -> int:
        return len(self.seg_slot_host)

    @property
    def max_segment(self) -> int:
        starts = self.seg_start_host
        return max((b - a for a, b in zip(starts, starts[1:])), default=0)

    @property
    def device(self) -> torch.device:
        return self.token_slot.device

    def segments(self):
        """(slot, token indices on the CPU) of every segment, in order."""
        for i, slot in enumerate(self.seg_slot_host):
            yield slot, self.order_host[self.seg_start_host[i]:self.seg_start_host[i + 1]]

    @classmethod
    def build(cls, slots: Sequence[int] | Tensor, num_slots: int, device: torch.device | str, *,
              tokens_per_slot: int = 1, where: str = "adapter_index") -> Routing:
        """The routing of a batch: `slots` gives one slot per row (-1: none), each row covering `tokens_per_slot`
        consecutive tokens. Slots are checked here, on the host, against 0 <= slot < num_slots."""
        host = _host_slots(slots, num_slots, where)
        token_slot = host.repeat_interleave(tokens_per_slot) if tokens_per_slot != 1 else host
        adapted = torch.nonzero(token_slot >= 0).flatten()
        sorted_slots, perm = torch.sort(token_slot[adapted], stable=True)
        order = adapted[perm]
        seg_slot, counts = torch.unique_consecutive(sorted_slots, return_counts=True)
        seg_start = torch.zeros(len(counts) + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=seg_start[1:])
        packed = torch.cat([token_slot, order, seg_start, seg_slot]).to(torch.int32)
        if torch.device(device).type == "cuda":
            packed = packed.pin_memory().to(device, non_blocking=True)
        else:
            packed = packed.to(device)
        m, a, s = token_slot.numel(), order.numel(), seg_slot.numel()
        return cls(packed[:m], packed[m:m + a], packed[m + a:m + a + s + 1], packed[m + a + s + 1:],
                   tuple(seg_start.tolist()), tuple(seg_slot.tolist()), order)

    @classmethod
    def for_input(cls, adapter_index, x: Tensor, num_slots: int, where: str) -> Routing:
        """The routing of an op input x (..., features): adapter_index is a Routing for it, or an integer tensor
        with one slot per token (x.shape[:-1]) or, for a 3-D x, one per row ((B,))."""
        if isinstance(adapter_index, Routing):
            routing = adapter_index
        elif not isinstance(adapter_index, Tensor):
            raise AdapterError(f"{where}: adapter_index must be an integer tensor (one slot per token, or per row of "
                               "a 3-D x) or a fastpeft.ops.Routing; pass e.g. torch.tensor([0, 1, -1]).")
        elif tuple(adapter_index.shape) == tuple(x.shape[:-1]):
            routing = cls.build(adapter_index.reshape(-1), num_slots, x.device, where=where)
        elif x.dim() == 3 and tuple(adapter_index.shape) == (x.shape[0],):
            routing = cls.build(adapter_index, num_slots, x.device, tokens_per_slot=x.shape[1], where=where)
        else:
            raise AdapterError(f"{where}: adapter_index has shape {tuple(adapter_index.shape)}; expected "
                               f"{tuple(x.shape[:-1])} (one per token) or, for a 3-D x, ({x.shape[0]},) (one per "
                               "row).")
        tokens = x.numel() // max(x.shape[-1], 1)
        if routing.num_tokens != tokens or routing.device != x.device:
            raise AdapterError(f"{where}: the routing covers {routing.num_tokens} tokens on {routing.device}, x has "
                               f"{tokens} on {x.device}; build it for this batch.")
        return routing


def _host_slots(slots, num_slots: int, where: str) -> Tensor:
    """The slots as a CPU int64 tensor, every one in [-1, num_slots)."""
    if isinstance(slots, Tensor):
        if slots.dtype.is_floating_point or slots.dtype.is_complex or slots.dtype == torch.bool:
            raise AdapterError(f"{where}: expected integer adapter indices, got a {slots.dtype} tensor; pass an int32 "
                               "or int64 tensor (e.g. ids.long()).")
        if slots.dim() != 1:
            raise AdapterError(f"{where}: expected a 1-D tensor of adapter indices (one per row), got shape "
                               f"{tuple(slots.shape)}; pass one index per row, e.g. ids.flatten().")
        if slots.device.type == "meta":
            raise AdapterError(f"{where}: the adapter indices are a meta tensor, which holds no values; pass them on "
                               "the CPU or x's device.")
        host = slots.detach().to("cpu", torch.int64)  # one synchronisation for a device tensor
    else:
        try:
            host = torch.tensor(list(slots), dtype=torch.int64)
        except (TypeError, ValueError, RuntimeError):
            raise AdapterError(f"{where}: expected a sequence of integer adapter indices, got {slots!r}; pass a "
                               "list of ints or an integer tensor.") from None
        host = host.reshape(-1)
    bad = torch.nonzero((host < -1) | (host >= num_slots)).flatten()
    if bad.numel():
        i = int(bad[0])
        raise AdapterError(f"{where}: adapter index {int(host[i])} at row {i} is out of range; valid indices are "
                           f"0..{num_slots - 1} (and -1 for no adapter).")
    return host


def pointer_table(rows: Sequence[Sequence[Tensor | None]], device: torch.device) -> Tensor:
    """(len(rows), S) int64: data_ptr of every tensor, 0 for None. Kernels cast an entry to a typed pointer."""
    table = torch.tensor([[0 if t is None else t.data_ptr() for t in row] for row in rows], dtype=torch.int64)
    return table.to(device)
