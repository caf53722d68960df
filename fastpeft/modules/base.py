"""`AdapterLayer`: what every adapter wrapper around one layer shares (the original kept as `base_layer`)."""
from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable

import torch
from torch import nn

from ..errors import ConfigError
from ..ops import activation
from .batch import current_batch


# What model code reads from a projection beyond weight, bias, in_features and out_features (which wrappers have):
# forwarded to the wrapped layer by name, so that any other missing attribute is an AttributeError.
FORWARDED = frozenset({"nf", "nx"})  # transformers' Conv1D sizes (GPT-2)


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
            if name in FORWARDED:
                return getattr(self.base_layer, name)
            wrapped = type(self._modules.get("base_layer")).__name__
            raise AttributeError(f"{type(self).__name__} (fastpeft's wrapper of {wrapped}) has no attribute {name!r}; "
                                 "the wrapped layer is its .base_layer.") from None

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
        """The adapters this forward applies: active, not merged, unless the layer is disabled (or a multi-adapter
        batch runs: then batch-aware layers pick each row's adapter and the others apply none)."""
        if self.disabled or current_batch(self) is not None:
            return []
        return [n for n in self.active_adapters if n not in self.merged_adapters]


class AdapterContainer(nn.Module):
    """Adapters registered beside model modules rather than wrapping one: bottleneck adapters after a sub-layer,
    invertible adapters on the embeddings, parameters shared by one adapter's layers. The container is an attribute
    of a model module (AdapterHub's name, so state-dict keys match its checkpoints) and runs through forward hooks
    it owns; `detach()` removes them. Adapters are its children by name, or those of `store()`."""

    def __init__(self):
        super().__init__()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []  # never merged; the lifecycle code asks every layer
        self.disabled = False
        self._handles: list = []

    def store(self) -> nn.Module:
        return self

    @property
    def adapter_names(self) -> list[str]:
        return list(self.store()._modules)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.store()._modules[name].parameters())

    def add(self, name: str, module: nn.Module) -> None:
        self.store().add_module(name, module)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter `name`'s tensors keyed by their path relative to the container."""
        holder = self.store()
        inner = "" if holder is self else next(k for k, m in self.named_children() if m is holder) + "."
        return {f"{inner}{name}.{key}": value for key, value in holder._modules[name].state_dict().items()}

    def delete_adapter(self, name: str) -> None:
        del self.store()._modules[name]
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def running_adapters(self) -> list[str]:
        return [] if self.disabled or current_batch(self) is not None else list(self.active_adapters)

    def hook(self, handle) -> None:
        """Keep a hook handle (anything with remove()); detach() removes it."""
        self._handles.append(handle)

    def on_detach(self, fn: Callable[[], object]) -> None:
        """Run fn when the container is detached (e.g. clear what it attached to other modules)."""
        self._handles.append(_Callback(fn))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@contextlib.contextmanager
def seeded(seed: int | None):
    """Inside the block, `seed` (when not None) fixes torch's random draws; the caller's RNG state is left alone."""
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        yield


class _Callback:
    """A hook-handle look-alike whose remove() runs a function."""

    def __init__(self, fn: Callable[[], object]):
        self.fn = fn

    def remove(self) -> None:
        self.fn()


class Activation(nn.Module):
    """A named non-linearity (AdapterHub's `non_linearity` names, case-insensitive; None: linear) as a module, for
    nn.Sequential layouts that match AdapterHub's parameter indices."""

    def __init__(self, name: str | None):
        super().__init__()
        self.name = "linear" if name is None else str(name).lower()
        try:
            activation(self.name)
        except ValueError as exc:
            raise ConfigError(f"non_linearity: {exc}") from None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return activation(self.name)(x)

    def extra_repr(self) -> str:
        return self.name
