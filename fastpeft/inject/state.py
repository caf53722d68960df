"""Per-model adapter bookkeeping: configs, where each adapter lives, which are active, what to restore."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from ..config import AdapterConfig
from ..errors import AdapterError
from ..modules.batch import BatchContext

ATTRIBUTE = "_fastpeft_state"
# Model-level behaviour that the layers above inject/ attach to a model while it holds adapters (checkpoint/ makes
# save_pretrained and Trainer checkpoints write adapters): (install, uninstall) pairs, registered at import time.
# install(model) runs when the model gets its first adapter and returns what uninstall(model, installed) needs to
# remove it again when the model loses its last adapter (delete_adapter, unload).
INSTALLERS: list[tuple[Callable, Callable]] = []


@dataclass
class AdapterState:
    configs: dict[str, AdapterConfig] = field(default_factory=dict)
    modules: dict[str, list[str]] = field(default_factory=dict)          # adapter -> wrapped module paths
    saved: dict[str, list[str]] = field(default_factory=dict)            # adapter -> modules_to_save paths
    active: list[str] = field(default_factory=list)
    original_requires_grad: dict[str, bool] = field(default_factory=dict)  # restored by unload
    hooks: dict[str, list] = field(default_factory=dict)                 # adapter -> hook handles to remove
    attention: str | None = None  # the attention implementation before attention-level adapters switched it
    batch: BatchContext = field(default_factory=BatchContext)  # adapter ids, the multi-adapter batch being run
    batch_hooks: list = field(default_factory=list)  # what lets the model take adapter_names=
    installed: list = field(default_factory=list)  # (uninstall, what install returned) of each of INSTALLERS

    def check_known(self, names, where: str) -> None:
        for name in names:
            if name not in self.configs:
                known = ", ".join(repr(n) for n in self.configs) or "none"
                raise AdapterError(f"{where}: no adapter named {name!r} on this model (adapters: {known}).")


def get_state(model: nn.Module, *, create: bool = False) -> AdapterState | None:
    state = getattr(model, ATTRIBUTE, None)
    if state is None and create:
        state = AdapterState(original_requires_grad={n: p.requires_grad for n, p in model.named_parameters()})
        object.__setattr__(model, ATTRIBUTE, state)  # a plain attribute, not a submodule
    return state


def require_state(model: nn.Module, where: str) -> AdapterState:
    state = get_state(model)
    if state is None or not state.configs:
        raise AdapterError(f"{where}: this {type(model).__name__} has no fastpeft adapters; "
                           "add one with fp.add_adapter(model, name, config).")
    return state


def register_installer(install: Callable, uninstall: Callable) -> None:
    """Add an (install, uninstall) pair to INSTALLERS (once); models that already hold adapters keep what they have."""
    if (install, uninstall) not in INSTALLERS:
        INSTALLERS.append((install, uninstall))


def install_all(model: nn.Module, state: AdapterState) -> None:
    """Run every installer on a model that has just got its first adapter."""
    try:
        for install, uninstall in INSTALLERS:
            state.installed.append((uninstall, install(model)))
    except BaseException:
        uninstall_all(model, state)
        raise


def uninstall_all(model: nn.Module, state: AdapterState) -> None:
    """Remove what install_all installed, last first."""
    while state.installed:
        uninstall, installed = state.installed.pop()
        uninstall(model, installed)


def clear_state(model: nn.Module) -> None:
    if hasattr(model, ATTRIBUTE):
        object.__delattr__(model, ATTRIBUTE)
