"""LoRA injection: plan (validate and resolve everything), then apply (mutate, recording how to undo)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..config import LoRAConfig
from ..modules import LoRALinear
from .swap import check_one_method, check_saved_overlap, wrap, wrap_saved
from .targets import resolve_linear_targets, resolve_modules_to_save


@dataclass
class LoRAPlan:
    targets: list[tuple[str, int, float]]  # (module path, r, alpha)
    saved: list[str]


def plan(model: nn.Module, name: str, config: LoRAConfig) -> LoRAPlan:
    paths = resolve_linear_targets(model, config, method="LoRAConfig", quantized=True)
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
