"""`AdapterLayer`: what every adapter wrapper around one layer shares (the original kept as `base_layer`)."""
from __future__ import annotations

import abc

import torch
from torch import nn


class AdapterLayer(nn.Module, abc.ABC):
    """A layer wrapper holding named adapters. Subclasses store the adapters and implement forward, merge,
    unmerge and delete_adapter; `adapter_parameters(name)` lists what training an adapter updates."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)  # model code that reads e.g. `proj.weight.dtype` keeps working

    @property
    @abc.abstractmethod
    def adapter_names(self) -> list[str]:
        """The adapters this layer holds, in the order they were added."""

    @abc.abstractmethod
    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """What training adapter `name` updates on this layer."""

    @abc.abstractmethod
    def merge(self, name: str) -> None:
        """Fold adapter `name` into the base weights (after those merged before)."""

    @abc.abstractmethod
    def unmerge(self) -> None:
        """Restore the base weights as they were before the first merge, bit for bit."""

    @abc.abstractmethod
    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name` (an error while it is merged)."""

    def running_adapters(self) -> list[str]:
        """The adapters this forward applies: active, not merged, unless the layer is disabled."""
        return [] if self.disabled else [n for n in self.active_adapters if n not in self.merged_adapters]
