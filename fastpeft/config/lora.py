"""LoRA (with rsLoRA and DoRA) and AdaLoRA configs."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from ._base import AdapterConfig
from ._checks import (check_alpha_dropout, check_flags, check_layers, check_layers_pattern, check_targets, fail,
                      pattern_value)


PEFT_ALIASES = {"lora_alpha": "alpha", "lora_dropout": "dropout", "init_lora_weights": "init_weights"}  # PEFT's names


@dataclass
class LoRAConfig(AdapterConfig):
    """LoRA: W' = W + s·B·A with A (r x in), B (out x r), s = alpha/r (or alpha/sqrt(r) with use_rslora).

    use_dora: DoRA (Liu et al. 2024), W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖ with the magnitude m (out,) learned.

    init_weights: True (Kaiming-uniform A, zero B: the adapter starts as the identity), "gaussian"
    (normal A with std 1/r, zero B), or False (random A and B; for tests, not identity).
    target_modules: list of module names (a name matches itself or any ".name" suffix), a regex matched
    against full module paths, "all-linear" (every linear layer but the output head), or None for the
    model family's default (the query and value projections).

    target_parameters (PEFT's field): fused mixture-of-experts tensors, by parameter path or its ".name" suffix,
    e.g. ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]. Each expert e of a tensor (E, ...) gets its own
    A_e (r x in) and B_e (out x r), stored as PEFT stores them (A (r·E, in), B (out, r·E) rank-major), and the
    tokens routed to e get s·(drop(x) A_eᵀ) B_eᵀ added to that expert's projection. With target_parameters and
    target_modules=None only the parameters are adapted (as PEFT); rank_pattern / alpha_pattern keys match
    parameter paths. dropout acts on the expert input of the adapter term: fastpeft computes it, but PEFT refuses
    lora_dropout != 0 for target_parameters, so such a checkpoint does not load into PEFT. use_dora and bias are
    not supported there.
    """

    method: ClassVar[str] = "lora"
    aliases: ClassVar[dict[str, str]] = PEFT_ALIASES

    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    modules_to_save: list[str] | None = None
    bias: str = "none"
    target_parameters: list[str] | None = None
    fan_in_fan_out: bool | None = None
    use_rslora: bool = False
    use_dora: bool = False
    init_weights: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    lora_alpha: float | None = field(default=None, repr=False, compare=False)
    lora_dropout: float | None = field(default=None, repr=False, compare=False)
    init_lora_weights: bool | str | None = field(default=None, repr=False, compare=False)

    def validate(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            fail(self, "r", f"rank must be a positive integer, got {self.r!r}", "use e.g. r=8")
        check_alpha_dropout(self)
        if self.use_dora not in (True, False):
            fail(self, "use_dora", f"got {self.use_dora!r}", "use True (DoRA) or False (LoRA)")
        if self.bias not in ("none", "all", "lora_only"):
            fail(self, "bias", f"got {self.bias!r}", 'use "none", "all" or "lora_only"')
        if self.init_weights not in (True, False, "gaussian"):
            fail(self, "init_weights", f"{self.init_weights!r} is not supported",
                 'use True (Kaiming A, zero B), "gaussian" or False')
        check_targets(self, "target_modules", self.target_modules)
        check_targets(self, "exclude_modules", self.exclude_modules)
        check_targets(self, "modules_to_save", self.modules_to_save if not isinstance(self.modules_to_save, str)
                      else [self.modules_to_save])
        check_layers(self, "layers_to_transform", self.layers_to_transform)
        check_layers_pattern(self)
        check_flags(self, "use_rslora", "fan_in_fan_out", optional=("fan_in_fan_out",))
        for key, r in self.rank_pattern.items():
            if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
                fail(self, "rank_pattern", f"rank {r!r} for {key!r} is not a positive integer",
                     f"give that entry a rank >= 1, e.g. {{{key!r}: 8}}")
        for key, a in self.alpha_pattern.items():
            if not isinstance(a, (int, float)) or isinstance(a, bool):
                fail(self, "alpha_pattern", f"alpha {a!r} for {key!r} is not a number",
                     f"give that entry a number, e.g. {{{key!r}: 16}}")
        self._check_target_parameters()
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = sorted(set(self.target_modules))
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]

    def _check_target_parameters(self) -> None:
        value = self.target_parameters
        if value is None:
            return
        if not isinstance(value, (list, tuple, set)) or not all(isinstance(v, str) and v for v in value):
            fail(self, "target_parameters", f"got {value!r}", 'pass a list of parameter names, e.g. '
                 '["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]')
        if not value:
            self.target_parameters = None
            return
        if self.use_dora:
            fail(self, "use_dora", "DoRA is not supported on expert tensors (target_parameters)",
                 "use use_dora=False, or adapt only linear layers (target_modules) with DoRA")
        if self.bias != "none":
            fail(self, "bias", f"bias={self.bias!r} is not supported with target_parameters",
                 'use bias="none"')
        self.target_parameters = sorted(set(value))

    def rank_for(self, module_name: str) -> int:
        return pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return pattern_value(self.alpha_pattern, module_name, self.alpha)

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


@dataclass
class AdaLoRAConfig(AdapterConfig):
    """AdaLoRA (Zhang et al. 2023): LoRA in SVD form, ΔW = B diag(E) A · alpha / init_r, whose rank budget falls
    from init_r per layer to target_r per layer on average, pruning the least important singular values.

    Budget schedule (PEFT's): full budget for the first `tinit` steps, then a cubic decay to the target until step
    `total_step - tfinal`, masking every `deltaT` steps; importance is |p ⊙ ∇p| smoothed with `beta1` times its
    uncertainty smoothed with `beta2`. `orth_reg_weight` weights ‖AAᵀ - I‖ + ‖BᵀB - I‖ added to the model's loss.
    Drive it with `fp.RankAllocator(model, name).update_and_allocate(model, step)` after `loss.backward()`.
    `rank_pattern` is the mask of kept ranks per layer that the allocator writes (PEFT's format).
    """

    method: ClassVar[str] = "adalora"
    aliases: ClassVar[dict[str, str]] = PEFT_ALIASES

    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    alpha: float = 8
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    rank_pattern: dict[str, list[bool]] | None = None
    lora_alpha: float | None = field(default=None, repr=False, compare=False)
    lora_dropout: float | None = field(default=None, repr=False, compare=False)
    init_lora_weights: bool | None = field(default=None, repr=False, compare=False)

    def validate(self) -> None:
        for name in ("init_r", "target_r"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                fail(self, name, f"must be a positive integer, got {value!r}", f"use e.g. {name}=8")
        if self.target_r > self.init_r:
            fail(self, "target_r", f"target_r={self.target_r} is above init_r={self.init_r}; the budget only "
                 "falls", "choose target_r <= init_r")
        if isinstance(self.total_step, bool) or not isinstance(self.total_step, int) or self.total_step <= 0:
            fail(self, "total_step", f"must be the number of training steps (> 0), got {self.total_step!r}",
                 "pass total_step=len(dataloader) * epochs")
        for name in ("tinit", "tfinal"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                fail(self, name, f"must be a non-negative integer, got {value!r}", f"use e.g. {name}=0")
        if self.tinit >= self.total_step - self.tfinal:
            fail(self, "tinit", f"tinit={self.tinit} leaves no steps to prune the budget before "
                 f"total_step - tfinal = {self.total_step - self.tfinal}",
                 "lower tinit or tfinal, or raise total_step")
        if isinstance(self.deltaT, bool) or not isinstance(self.deltaT, int) or self.deltaT < 1:
            fail(self, "deltaT", f"must be a positive integer, got {self.deltaT!r}", "use e.g. deltaT=10")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
                fail(self, name, f"must be in (0, 1), got {value!r}", f"use e.g. {name}=0.85")
        if not isinstance(self.orth_reg_weight, (int, float)) or self.orth_reg_weight < 0:
            fail(self, "orth_reg_weight", f"must be >= 0, got {self.orth_reg_weight!r}", "use e.g. 0.5, or 0 for none")
        check_alpha_dropout(self)
        if self.init_weights not in (True, False):
            fail(self, "init_weights", f"got {self.init_weights!r}", "use True (E = 0: the identity) or False")
        check_targets(self, "target_modules", self.target_modules)
        check_targets(self, "exclude_modules", self.exclude_modules)
        check_targets(self, "modules_to_save", self.modules_to_save if not isinstance(self.modules_to_save, str)
                      else [self.modules_to_save])
        check_layers(self, "layers_to_transform", self.layers_to_transform)
        check_layers_pattern(self)
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = sorted(set(self.target_modules))
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]

    def scaling(self) -> float:
        """PEFT's AdaLoRA scale: alpha (or init_r when alpha is 0) over the initial rank (+1e-5)."""
        return (self.alpha if self.alpha > 0 else float(self.init_r)) / (self.init_r + 1e-5)
