"""LoRA injection: plan (resolve and validate, no changes), then apply (wrap and add, recording undo steps)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..config import LoRAConfig
from ..errors import TargetError
from ..modules import LoRALinear, ModulesToSave
from .targets import model_modules, parent_of, resolve_linear_targets, resolve_modules_to_save


@dataclass
class LoRAPlan:
    targets: list[tuple[str, int, float]]  # (module path, r, alpha)
    saved: list[str]                       # modules_to_save paths


def plan(model: nn.Module, name: str, config: LoRAConfig) -> LoRAPlan:
    paths = resolve_linear_targets(model, config, method="LoRAConfig")
    saved = resolve_modules_to_save(model, config.modules_to_save, "LoRAConfig")
    adapted = set(paths) | {n for n, m in model_modules(model) if isinstance(m, LoRALinear)}
    overlap = sorted({s for s in saved for p in adapted if s == p or p.startswith(s + ".") or s.startswith(p + ".")})
    if overlap:
        raise TargetError(f"LoRAConfig: modules_to_save entr{'y' if len(overlap) == 1 else 'ies'} "
                          f"{', '.join(overlap)} is, or contains, a LoRA-adapted layer (of this or another adapter); "
                          "a module cannot be both adapted and copied whole, so remove it from one of the two.")
    return LoRAPlan([(p, config.rank_for(p), config.alpha_for(p)) for p in paths], saved)


def wrap(model: nn.Module, path: str, wrapper_type: type, undo: list[Callable]) -> nn.Module:
    """The fastpeft wrapper at `path`, creating it around the original module if needed."""
    module = model.get_submodule(path)
    if isinstance(module, wrapper_type):
        return module
    wrapper = wrapper_type(module)
    parent, attr = parent_of(model, path)
    setattr(parent, attr, wrapper)
    undo.append(lambda: setattr(parent, attr, module))
    return wrapper


def apply(model: nn.Module, name: str, config: LoRAConfig, lora_plan: LoRAPlan, undo: list[Callable]) -> None:
    for path, r, alpha in lora_plan.targets:
        layer = wrap(model, path, LoRALinear, undo)
        layer.add_adapter(name, r, alpha, dropout=config.dropout, use_rslora=config.use_rslora,
                          init_weights=config.init_weights)
        undo.append(lambda layer=layer: layer.delete_adapter(name))
    for path in lora_plan.saved:
        holder = wrap(model, path, ModulesToSave, undo)
        holder.add_adapter(name)
        undo.append(lambda holder=holder: holder.delete_adapter(name))
