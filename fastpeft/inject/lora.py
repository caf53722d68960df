"""LoRA injection: plan (validate and resolve everything), then apply (mutate, recording how to undo).

Also the steps every method's injection shares: wrapping a module in place, modules_to_save, and the checks
that a layer holds adapters of one method only and is not both adapted and copied whole.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..config import LoRAConfig
from ..errors import TargetError
from ..modules import AdapterLayer, IA3Linear, LoRALinear, ModulesToSave
from .targets import model_modules, parent_of, resolve_linear_targets, resolve_modules_to_save


@dataclass
class LoRAPlan:
    targets: list[tuple[str, int, float]]  # (module path, r, alpha)
    saved: list[str]


def plan(model: nn.Module, name: str, config: LoRAConfig) -> LoRAPlan:
    paths = resolve_linear_targets(model, config, method="LoRAConfig")
    check_one_method(model, paths, LoRALinear, "LoRAConfig")
    saved = resolve_modules_to_save(model, config.modules_to_save, "LoRAConfig")
    check_saved_overlap(model, paths, saved, "LoRAConfig")
    return LoRAPlan([(p, config.rank_for(p), config.alpha_for(p)) for p in paths], saved)


def apply(model: nn.Module, name: str, config: LoRAConfig, lora_plan: LoRAPlan, undo: list[Callable]) -> None:
    for path, r, alpha in lora_plan.targets:
        layer = wrap(model, path, LoRALinear, LoRALinear, undo)
        layer.add_adapter(name, r, alpha, dropout=config.dropout, use_rslora=config.use_rslora,
                          init_weights=config.init_weights, use_dora=config.use_dora)
        undo.append(lambda layer=layer: layer.delete_adapter(name))
    wrap_saved(model, name, lora_plan.saved, undo)


# ------------------------------------------------------------------------------------------------ shared steps
NESTING = {LoRALinear, IA3Linear}  # IA3 layers wrap LoRA layers: one layer holds adapters of both methods


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
        holder = wrap(model, path, ModulesToSave, ModulesToSave, undo)
        holder.add_adapter(name)
        undo.append(lambda holder=holder: holder.delete_adapter(name))
