"""Module swapping, the steps every method's injection shares: wrap a module in place (and undo it), register a
container beside model modules, copy modules_to_save, find the wrappers of a model, and the checks that a layer
holds adapters of one method only and is not both adapted and copied whole.

Each mutating step appends to `undo` the step that reverts it, so a failing add_adapter leaves the model as it was.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..errors import TargetError
from ..modules import AdapterContainer, AdapterLayer, IA3Linear, LoRALinear, ModulesToSave
from .targets import join, model_modules, parent_of

NESTING = {LoRALinear, IA3Linear}  # IA3 layers wrap LoRA layers: one layer holds adapters of both methods


def wrappers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every fastpeft wrapper and container of the model (LoRA layers inside IA3 layers too), outer first."""
    return [(n, m) for n, m in model_modules(model, nested=True)
            if isinstance(m, (AdapterLayer, ModulesToSave, AdapterContainer))]


def holder(model: nn.Module, path: str, name: str) -> tuple[str, nn.Module]:
    """(path, module) of the wrapper at `path` that holds adapter `name` (the LoRA layer inside an IA3 layer)."""
    module = model.get_submodule(path)
    while isinstance(module, AdapterLayer) and name not in module.adapter_names and isinstance(
            module.base_layer, AdapterLayer):
        path, module = f"{path}.base_layer", module.base_layer
    return path, module


def check_one_method(model: nn.Module, paths: list[str], wrapper_type: type, method: str) -> None:
    """A layer holds adapters of one method (or LoRA and IA3 ones: an IA3Linear around a LoRALinear): refuse targets
    already wrapped by another method's layer."""
    for path in paths:
        module = model.get_submodule(path)
        nests = {type(module), wrapper_type} <= NESTING
        if isinstance(module, AdapterLayer) and not isinstance(module, wrapper_type) and not nests:
            raise TargetError(f"{method}: {path} already holds {type(module).__name__} adapters "
                              f"({', '.join(module.adapter_names)}); one layer takes adapters of one method. "
                              "Exclude it (exclude_modules) or delete those adapters first.")


def check_saved_overlap(model: nn.Module, paths: list[str], saved: list[str], method: str) -> None:
    """modules_to_save may not be, contain or lie inside an adapted layer (of this or another adapter)."""
    adapted = set(paths) | {n for n, m in model_modules(model) if isinstance(m, AdapterLayer)}
    overlap = sorted({s for s in saved for p in adapted if s == p or p.startswith(s + ".") or s.startswith(p + ".")})
    if overlap:
        raise TargetError(f"{method}: modules_to_save entr{'y' if len(overlap) == 1 else 'ies'} "
                          f"{', '.join(overlap)} is, or contains, an adapted layer (of this or another adapter); "
                          "a module cannot be both adapted and copied whole, so remove it from one of the two.")


def wrap(model: nn.Module, path: str, make: Callable[[nn.Module], nn.Module], wrapper_type: type,
         undo: list[Callable]) -> nn.Module:
    """The `wrapper_type` wrapper at `path`, creating it around the original module with `make` if needed."""
    module = model.get_submodule(path)
    if isinstance(module, wrapper_type):
        return module
    if isinstance(module, IA3Linear) and wrapper_type is LoRALinear:  # LoRA goes inside: y = l ⊙ (LoRA layer)
        original = module.base_layer
        if isinstance(original, LoRALinear):
            return original
        module.base_layer = make(original).train(original.training)
        undo.append(lambda: setattr(module, "base_layer", original))
        return module.base_layer
    wrapper = make(module).train(module.training)  # a new module starts in training mode: follow the model's
    parent, attr = parent_of(model, path)
    setattr(parent, attr, wrapper)
    undo.append(lambda: setattr(parent, attr, module))
    return wrapper


def wrap_saved(model: nn.Module, name: str, saved: list[str], undo: list[Callable]) -> None:
    """A trainable copy of each modules_to_save module for adapter `name`."""
    for path in saved:
        copies = wrap(model, path, ModulesToSave, ModulesToSave, undo)
        copies.add_adapter(name)
        undo.append(lambda copies=copies: copies.delete_adapter(name))


def container(model: nn.Module, parent_path: str, attr: str, make: Callable[[], AdapterContainer],
              undo: list[Callable], attach: Callable[[AdapterContainer], None] | None = None) -> AdapterContainer:
    """The container `attr` of the module at `parent_path`, created (and its hooks attached) if needed."""
    parent = model.get_submodule(parent_path)
    existing = getattr(parent, attr, None) if attr in parent._modules else None
    if existing is not None:
        return existing
    if hasattr(parent, attr):
        raise TargetError(f"{join(parent_path, attr)} already exists and is not a fastpeft container (a model loaded "
                          "with AdapterHub?); use a plain transformers model.")
    made = make().train(parent.training)  # a new module starts in training mode: follow the model's
    parent.add_module(attr, made)
    if attach is not None:
        attach(made)

    def remove():
        made.detach()
        delattr(parent, attr)
    undo.append(remove)
    return made


def unwrap(model: nn.Module, path: str, wrapper: nn.Module, replacement: nn.Module | None = None) -> None:
    """Put the original module back at `path` (or `replacement`); a container is detached and removed."""
    parent, attr = parent_of(model, path)
    if isinstance(wrapper, AdapterContainer):
        wrapper.detach()
        delattr(parent, attr)
        return
    original = wrapper.base_layer if isinstance(wrapper, AdapterLayer) else wrapper.original_module
    setattr(parent, attr, replacement if replacement is not None else original)
