"""`ModulesToSave`: a trainable copy of a whole module per adapter (PEFT's `modules_to_save`), e.g. a new head.

The original module stays intact as `original_module`; the copy of the first active adapter that has one runs. In a
multi-adapter batch each row runs the copy of its own adapter (the original for rows whose adapter has none).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .batch import current_batch


class ModulesToSave(nn.Module):
    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "original_module":
                raise
            return getattr(self.original_module, name)  # e.g. `lm_head.weight` for code that reads it

    def add_adapter(self, name: str) -> None:
        module = copy.deepcopy(self.original_module)
        for p in module.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = module

    def delete_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def forward(self, *args, **kwargs):
        batch = current_batch(self)
        if batch is not None and not self.disabled and args and isinstance(args[0], torch.Tensor):
            return self._batch_forward(batch, *args, **kwargs)
        if not self.disabled:
            for name in self.active_adapters:
                if name in self.modules_to_save:
                    return self.modules_to_save[name](*args, **kwargs)
        return self.original_module(*args, **kwargs)

    @torch.compiler.disable  # multi-adapter batches run eagerly (host-side routing)
    def _batch_forward(self, batch, x: torch.Tensor, *args, **kwargs):
        """The original on every row, then each group of rows whose adapter has a copy replaced by the copy's output
        (rows are x's first dimension)."""
        groups: dict[str, list[int]] = {}
        for row, name in enumerate(batch.row_names(x.shape[0], "modules_to_save")):
            if name in self.modules_to_save:
                groups.setdefault(name, []).append(row)
        out = self.original_module(x, *args, **kwargs)
        for name, rows in groups.items():
            index = torch.tensor(rows, device=x.device)
            out = out.index_copy(0, index, self.modules_to_save[name](x.index_select(0, index), *args, **kwargs))
        return out
