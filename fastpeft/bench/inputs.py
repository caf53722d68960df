"""Input pools: copies of a case's inputs, cycled call after call, so that no timing sees its operands cache-hot.

`InputPool.build(make_one, device)` makes enough copies that one pass over all of them moves more than 2x the
last-level cache (CUDA: L2_cache_size, else 50 MB).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import torch

from .devices import cache_bytes


def tensor_bytes(obj: Any) -> int:
    """Total bytes of the tensors inside obj (tensors, modules' parameters, and dicts/lists/tuples of them)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0  # modules are expected to share storage with tensors already counted


class InputPool:
    """Copies of one case's inputs, handed out in turn by `next()`.

    `build` makes `copies = clamp(ceil(factor * cache / item_bytes), min_copies, max_copies)` items, so a
    full cycle touches more than `factor` x the cache (2x L2 by default), capped so the pool stays under
    `memory_fraction` of the free device memory.
    """

    def __init__(self, items: list[Any], item_bytes: int):
        self.items = items
        self.item_bytes = item_bytes
        self._cycle = itertools.cycle(items)

    def __len__(self) -> int:
        return len(self.items)

    def next(self) -> Any:
        return next(self._cycle)

    @property
    def first(self) -> Any:
        return self.items[0]

    @classmethod
    def build(cls, make_one: Callable[[], Any], device: torch.device, *, factor: float = 2.0, min_copies: int = 2,
              max_copies: int = 64, memory_fraction: float = 0.5) -> "InputPool":
        first = make_one()
        item_bytes = max(1, tensor_bytes(first))
        copies = min(max_copies, max(min_copies, math.ceil(factor * cache_bytes(device) / item_bytes)))
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            copies = max(1, min(copies, int(memory_fraction * free / item_bytes) + 1))
        return cls([first] + [make_one() for _ in range(copies - 1)], item_bytes)

    def describe(self) -> dict:
        return {"copies": len(self), "item_bytes": self.item_bytes, "total_bytes": self.item_bytes * len(self)}
