"""IA3 injection: plan (validate, resolve targets and which of them are feed-forward), then apply."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..config import IA3Config
from ..errors import TargetError
from ..modules import IA3Linear
from .families import default_ia3_targets, family_of
from .swap import check_one_method, check_saved_overlap, wrap, wrap_saved
from .targets import name_matches, resolve_linear_targets, resolve_modules_to_save


@dataclass
class IA3Plan:
    targets: list[tuple[str, bool]]  # (module path, is_feedforward)
    saved: list[str]


def plan(model: nn.Module, name: str, config: IA3Config) -> IA3Plan:
    paths = resolve_linear_targets(model, config, method="IA3Config",
                                   default=lambda family: default_ia3_targets(family)[0], quantized=True)
    feedforward = config.feedforward_modules
    if config.target_modules is None:
        feedforward = default_ia3_targets(family_of(model)[1])[1]
    feedforward = feedforward or []
    if not isinstance(feedforward, str):
        unmatched = [f for f in feedforward if not any(name_matches(p, [f]) for p in paths)]
        if unmatched:
            raise TargetError(f"IA3Config.feedforward_modules: {unmatched} match none of the targeted layers "
                              f"({', '.join(paths[:6])}{', ...' if len(paths) > 6 else ''}); name layers that "
                              "target_modules also selects.")
    targets = [(p, name_matches(p, feedforward)) for p in paths]
    for path, ff in targets:
        module = model.get_submodule(path)
        if isinstance(module, IA3Linear) and module.is_feedforward != ff:
            raise TargetError(f"IA3Config: {path} already holds IA3 adapters that scale its "
                              f"{'input' if module.is_feedforward else 'output'}; a second adapter must do the same "
                              "(adjust feedforward_modules).")
    check_one_method(model, paths, IA3Linear, "IA3Config")
    saved = resolve_modules_to_save(model, config.modules_to_save, "IA3Config")
    check_saved_overlap(model, paths, saved, "IA3Config")
    return IA3Plan(targets, saved)


def apply(model: nn.Module, name: str, config: IA3Config, ia3_plan: IA3Plan, undo: list[Callable]) -> None:
    for path, ff in ia3_plan.targets:
        layer = wrap(model, path, lambda base, ff=ff: IA3Linear(base, is_feedforward=ff), IA3Linear, undo)
        layer.add_adapter(name, init_weights=config.init_weights)
        undo.append(lambda layer=layer: layer.delete_adapter(name))
    wrap_saved(model, name, ia3_plan.saved, undo)

