"""LoRA injection: plan (validate and resolve everything), then apply (mutate, recording how to undo).

Linear layers (target_modules) get a LoRALinear; experts modules whose fused tensors target_parameters names get
one LoRAExperts holding the adapter's pair of every targeted tensor.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from torch import nn

from ..config import LoRAConfig
from ..errors import TargetError
from ..modules import LoRALinear
from ..modules.moe_lora import LoRAExperts, expert_features
from .families import ExpertsLayout, experts_layout
from .swap import check_one_method, check_saved_overlap, wrap, wrap_saved
from .targets import join, resolve_linear_targets, resolve_modules_to_save, resolve_parameter_targets


class ExpertTarget(NamedTuple):
    path: str                                # the experts module
    ranks: dict[str, tuple[int, float]]      # targeted tensor -> (r, alpha)
    layout: ExpertsLayout


@dataclass
class LoRAPlan:
    targets: list  # (module path, r, alpha) per linear layer, then an ExpertTarget per experts module
    saved: list[str]


def plan(model: nn.Module, name: str, config: LoRAConfig) -> LoRAPlan:
    params = config.target_parameters
    only_params = bool(params) and not config.target_modules  # PEFT: target_parameters alone adapt no module
    paths = [] if only_params else resolve_linear_targets(model, config, method="LoRAConfig", quantized=True)
    check_one_method(model, paths, LoRALinear, "LoRAConfig")
    experts = _expert_targets(model, config) if params else []
    check_one_method(model, [t.path for t in experts], LoRAExperts, "LoRAConfig")
    saved = resolve_modules_to_save(model, config.modules_to_save, "LoRAConfig")
    check_saved_overlap(model, paths + [t.path for t in experts], saved, "LoRAConfig")
    linear = [(p, config.rank_for(p), config.alpha_for(p)) for p in paths]
    return LoRAPlan(linear + experts, saved)


def _expert_targets(model: nn.Module, config: LoRAConfig) -> list[ExpertTarget]:
    """The experts modules and tensors target_parameters names, with each tensor's rank (rank_pattern and
    alpha_pattern keys match the parameter's path, as in PEFT); a rank above a tensor's dimensions is refused."""
    out = []
    for path, names in resolve_parameter_targets(model, config.target_parameters, "LoRAConfig"):
        module = model.get_submodule(path)
        experts = module.base_layer if isinstance(module, LoRAExperts) else module
        layout = experts_layout(experts)
        ranks = {}
        for pname in names:
            in_f, out_f = expert_features(experts, pname, layout.params[pname])
            key = join(path, pname)
            r = config.rank_for(key)
            if r > min(in_f, out_f):
                raise TargetError(f"LoRAConfig: rank {r} for {key} is larger than its per-expert matrix "
                                  f"({out_f} x {in_f}); choose r <= {min(in_f, out_f)} (r, or rank_pattern for this "
                                  "tensor). Nothing was changed.")
            ranks[pname] = (r, config.alpha_for(key))
        out.append(ExpertTarget(path, ranks, layout))
    return out


def apply(model: nn.Module, name: str, config: LoRAConfig, lora_plan: LoRAPlan, undo: list[Callable]) -> None:
    for target in lora_plan.targets:
        if isinstance(target, ExpertTarget):
            layer = wrap(model, target.path, lambda m, layout=target.layout: LoRAExperts(m, layout), LoRAExperts,
                         undo)
            layer.add_adapter(name, target.ranks, dropout=config.dropout, use_rslora=config.use_rslora,
                              init_weights=config.init_weights)
        else:
            path, r, alpha = target
            layer = wrap(model, path, LoRALinear, LoRALinear, undo)
            layer.add_adapter(name, r, alpha, dropout=config.dropout, use_rslora=config.use_rslora,
                              init_weights=config.init_weights, use_dora=config.use_dora)
        undo.append(lambda layer=layer: layer.delete_adapter(name))
    wrap_saved(model, name, lora_plan.saved, undo)
