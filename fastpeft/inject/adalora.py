"""AdaLoRA: injection (LoRA layers in SVD form), the orthogonal regularisation added to the model's loss, and the
rank allocator that prunes singular values to the budget (Zhang et al. 2023, with PEFT's schedule and scores).

    allocator = fp.RankAllocator(model, "name")
    for step, batch in enumerate(loader):
        loss = model(**batch).loss          # includes orth_reg_weight · mean(‖AAᵀ - I‖_F, ‖BᵀB - I‖_F)
        loss.backward(); optimizer.step()
        allocator.update_and_allocate(model, step)   # before optimizer.zero_grad(): it reads the gradients
        optimizer.zero_grad()
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..config import AdaLoRAConfig
from ..errors import AdapterError, ConfigError
from ..modules import LoRALinear
from ..modules.lora import OrthogonalPenalty, orthogonality
from .state import get_state, require_state
from .wrapped import unwrap_model
from .swap import check_one_method, check_saved_overlap, wrap, wrap_saved
from .targets import model_modules, resolve_linear_targets, resolve_modules_to_save


@dataclass
class AdaLoRAPlan:
    targets: list[tuple[str, int, float]]  # (module path, init_r, alpha)
    saved: list[str]


def plan(model: nn.Module, name: str, config: AdaLoRAConfig) -> AdaLoRAPlan:
    paths = resolve_linear_targets(model, config, method="AdaLoRAConfig")
    check_one_method(model, paths, LoRALinear, "AdaLoRAConfig")
    saved = resolve_modules_to_save(model, config.modules_to_save, "AdaLoRAConfig")
    check_saved_overlap(model, paths, saved, "AdaLoRAConfig")
    return AdaLoRAPlan([(p, config.init_r, config.alpha) for p in paths], saved)


def apply(model: nn.Module, name: str, config: AdaLoRAConfig, ada_plan: AdaLoRAPlan, undo: list[Callable]) -> None:
    for path, r, alpha in ada_plan.targets:
        layer = wrap(model, path, LoRALinear, LoRALinear, undo)
        layer.add_adapter(name, r, alpha, dropout=config.dropout, init_weights=config.init_weights, svd=True,
                          scaling=config.scaling())
        undo.append(lambda layer=layer: layer.delete_adapter(name))
    wrap_saved(model, name, ada_plan.saved, undo)
    layers = [m for _, m in svd_layers(model, name)]
    handle = model.register_forward_hook(OrthogonalPenalty(name, config, layers))
    get_state(model).hooks[name] = [handle]
    undo.append(lambda: (handle.remove(), get_state(model).hooks.pop(name, None)))


def svd_layers(model: nn.Module, name: str) -> list[tuple[str, LoRALinear]]:
    """(path, layer) of every layer holding AdaLoRA adapter `name`."""
    return [(p, m) for p, m in model_modules(model, nested=True) if isinstance(m, LoRALinear) and name in m.lora_E]


def orth_regularization(model: nn.Module, name: str) -> torch.Tensor:
    """mean over the adapter's A and B of ‖AAᵀ - I‖_F and ‖BᵀB - I‖_F (PEFT's orthogonality penalty)."""
    return orthogonality(name, [layer for _, layer in svd_layers(model, name)])


class RankAllocator:
    """The AdaLoRA budget: importance-scored pruning of singular values E, across all layers of one adapter."""

    def __init__(self, model: nn.Module, name: str):
        model = unwrap_model(model, "RankAllocator")
        state = require_state(model, "RankAllocator")
        state.check_known([name], "RankAllocator")
        if not isinstance(state.configs[name], AdaLoRAConfig):
            raise ConfigError(f"RankAllocator: adapter {name!r} is a {type(state.configs[name]).__name__}; the rank "
                              "allocator drives AdaLoRA adapters (fp.AdaLoRAConfig).")
        self.name, self.config = name, state.configs[name]
        layers = svd_layers(model, name)
        self.init_budget = sum(layer.r[name] for _, layer in layers)
        self.target_budget = self.config.target_r * len(layers)
        self.reset()

    def reset(self) -> None:
        self.sensitivity: dict[tuple[str, str], torch.Tensor] = {}  # EMA of |p ⊙ ∇p|
        self.uncertainty: dict[tuple[str, str], torch.Tensor] = {}  # EMA of its deviation

    def budget(self, step: int) -> tuple[int, bool]:
        """(ranks kept over all layers, whether this step masks): flat, cubic decay, then the target."""
        c = self.config
        if step <= c.tinit:
            return self.init_budget, False
        if step > c.total_step - c.tfinal:
            return self.target_budget, True
        left = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        return int((self.init_budget - self.target_budget) * left**3 + self.target_budget), step % c.deltaT == 0

    @torch.no_grad()
    def update_and_allocate(self, model: nn.Module, step: int) -> int:
        """Call after loss.backward() (and optimizer.step()), before zero_grad(). Returns the current budget."""
        model, c = unwrap_model(model, "RankAllocator.update_and_allocate"), self.config
        final = c.total_step - c.tfinal
        if step < final:
            self._update_importance(model)
            budget, mask_now = self.budget(step)
            if mask_now:
                c.rank_pattern = self._mask_to_budget(model, budget)
            return budget
        if step == final:
            c.rank_pattern = self._mask_to_budget(model, self.target_budget)
            self.reset()
        elif c.rank_pattern:
            apply_rank_pattern(model, self.name, c.rank_pattern)
        return self.target_budget

    def _update_importance(self, model: nn.Module) -> None:
        c = self.config
        params = [(path, kind, getattr(layer, kind)[self.name])
                  for path, layer in svd_layers(model, self.name) for kind in ("lora_A", "lora_B", "lora_E")]
        for path, kind, p in params:  # every gradient checked before any score moves
            if p.grad is None:
                raise AdapterError(f"RankAllocator.update_and_allocate: {path}.{kind}.{self.name} has no gradient;"
                                   " call it after loss.backward() and before optimizer.zero_grad().")
        for path, kind, p in params:
            ipt = (p * p.grad).abs().float()
            key = (path, kind)
            avg = self.sensitivity.get(key, torch.zeros_like(ipt))
            unc = self.uncertainty.get(key, torch.zeros_like(ipt))
            self.sensitivity[key] = c.beta1 * avg + (1 - c.beta1) * ipt
            self.uncertainty[key] = c.beta2 * unc + (1 - c.beta2) * (ipt - self.sensitivity[key]).abs()

    def _triplet_scores(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Per layer (r,): score(E_i) + mean score of row i of A + mean score of column i of B."""
        scores = {}
        for path, _ in svd_layers(model, self.name):
            s = {k: self.sensitivity[(path, k)] * self.uncertainty[(path, k)] for k in ("lora_A", "lora_B", "lora_E")}
            scores[path] = s["lora_E"].view(-1) + s["lora_A"].mean(1) + s["lora_B"].mean(0)
        return scores

    def _mask_to_budget(self, model: nn.Module, budget: int) -> dict[str, list[bool]]:
        scores = self._triplet_scores(model)
        prune = self.init_budget - budget
        threshold = (torch.kthvalue(torch.cat([s.cpu() for s in scores.values()]), prune).values.item()
                     if prune > 0 else -float("inf"))
        pattern = {f"{path}.lora_E": (score > threshold).view(-1).tolist() for path, score in scores.items()}
        apply_rank_pattern(model, self.name, pattern)
        return pattern


def apply_rank_pattern(model: nn.Module, name: str, pattern: dict[str, list[bool]]) -> None:
    """Zero the pruned singular values: E_i = 0 where the pattern says False."""
    with torch.no_grad():
        for path, layer in svd_layers(model, name):
            keep = pattern.get(f"{path}.lora_E")
            if keep is not None:
                e = layer.lora_E[name]
                e.masked_fill_(~torch.tensor(keep, dtype=torch.bool, device=e.device), 0.0)
