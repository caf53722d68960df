"""Adapter configs: one dataclass per method, validated on creation with errors that name the field and the fix.

Field names follow the seed libraries: AdapterHub `adapters` for hyperparameters (`r`, `alpha`, `dropout`),
PEFT for targeting (`target_modules`, `layers_to_transform`, `modules_to_save`, `bias`, `use_rslora`);
PEFT's spellings `lora_alpha`, `lora_dropout` and `init_lora_weights` are accepted as aliases.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import ConfigError


@dataclass
class AdapterConfig:
    """Base of every fastpeft config: validation, dict round trip and aliases."""

    method: ClassVar[str] = ""
    aliases: ClassVar[dict[str, str]] = {}

    def validate(self) -> None:  # overridden per method
        pass

    def to_dict(self) -> dict[str, Any]:
        """Canonical field names only; JSON-serialisable."""
        out = {"method": self.method}
        for f in dataclasses.fields(self):
            if f.name in self.aliases:
                continue
            value = getattr(self, f.name)
            out[f.name] = sorted(value) if isinstance(value, set) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        data = {k: v for k, v in data.items() if k != "method"}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}; "
                              f"known fields: {', '.join(sorted(names - set(cls.aliases)))}.")
        return cls(**data)

    def _apply_aliases(self) -> None:
        for alias, canonical in self.aliases.items():
            value = getattr(self, alias)
            if value is None:
                continue
            default = next(f.default for f in dataclasses.fields(self) if f.name == canonical)
            if getattr(self, canonical) != default and getattr(self, canonical) != value:
                raise ConfigError(f"{type(self).__name__}: both {canonical}={getattr(self, canonical)!r} and its "
                                  f"alias {alias}={value!r} were given; pass only one.")
            setattr(self, canonical, value)
            setattr(self, alias, None)

    def __post_init__(self) -> None:
        self._apply_aliases()
        self.validate()


def _fail(cfg, field_name: str, problem: str, fix: str) -> None:
    raise ConfigError(f"{type(cfg).__name__}.{field_name}: {problem}; {fix}.")


def _check_targets(cfg, name: str, value) -> None:
    if value is None or isinstance(value, str):
        if isinstance(value, str) and value != "all-linear":
            try:
                re.compile(value)
            except re.error as exc:
                _fail(cfg, name, f"{value!r} is not a valid regular expression ({exc})",
                      "pass a list of module names or a valid regex")
        return
    if not isinstance(value, (list, tuple, set)) or not all(isinstance(v, str) and v for v in value):
        _fail(cfg, name, f"got {value!r}", 'pass a list of module names, a regex string, or "all-linear"')


def _check_layers(cfg, name: str, value) -> None:
    if value is None:
        return
    values = [value] if isinstance(value, int) else value
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                        for v in values):
        _fail(cfg, name, f"got {value!r}", "pass a layer index or a list of non-negative layer indices")


def _check_alpha_dropout(cfg) -> None:
    if isinstance(cfg.alpha, bool) or not isinstance(cfg.alpha, (int, float)) or not math.isfinite(cfg.alpha):
        _fail(cfg, "alpha", f"must be a finite number, got {cfg.alpha!r}", "use e.g. alpha=16")
    if not isinstance(cfg.dropout, (int, float)) or not 0.0 <= cfg.dropout < 1.0:
        _fail(cfg, "dropout", f"must be in [0, 1), got {cfg.dropout!r}", "use e.g. dropout=0.05, or 0.0")


@dataclass
class LoRAConfig(AdapterConfig):
    """LoRA: W' = W + s·B·A with A (r x in), B (out x r), s = alpha/r (or alpha/sqrt(r) with use_rslora).

    use_dora: DoRA (Liu et al. 2024), W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖ with the magnitude m (out,) learned.

    init_weights: True (Kaiming-uniform A, zero B: the adapter starts as the identity), "gaussian"
    (normal A with std 1/r, zero B), or False (random A and B; for tests, not identity).
    target_modules: list of module names (a name matches itself or any ".name" suffix), a regex matched
    against full module paths, "all-linear" (every linear layer but the output head), or None for the
    model family's default (the query and value projections).
    """

    method: ClassVar[str] = "lora"
    aliases: ClassVar[dict[str, str]] = {"lora_alpha": "alpha", "lora_dropout": "dropout",
                                         "init_lora_weights": "init_weights"}

    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    modules_to_save: list[str] | None = None
    bias: str = "none"
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
            _fail(self, "r", f"rank must be a positive integer, got {self.r!r}", "use e.g. r=8")
        _check_alpha_dropout(self)
        if self.use_dora not in (True, False):
            _fail(self, "use_dora", f"got {self.use_dora!r}", "use True (DoRA) or False (LoRA)")
        if self.bias not in ("none", "all", "lora_only"):
            _fail(self, "bias", f"got {self.bias!r}", 'use "none", "all" or "lora_only"')
        if self.init_weights not in (True, False, "gaussian"):
            _fail(self, "init_weights", f"{self.init_weights!r} is not supported",
                  'use True (Kaiming A, zero B), "gaussian" or False')
        _check_targets(self, "target_modules", self.target_modules)
        _check_targets(self, "exclude_modules", self.exclude_modules)
        _check_targets(self, "modules_to_save", self.modules_to_save if not isinstance(self.modules_to_save, str)
                       else [self.modules_to_save])
        _check_layers(self, "layers_to_transform", self.layers_to_transform)
        for key, r in self.rank_pattern.items():
            if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
                _fail(self, "rank_pattern", f"rank {r!r} for {key!r} is not a positive integer", "fix that entry")
        for key, a in self.alpha_pattern.items():
            if not isinstance(a, (int, float)) or isinstance(a, bool):
                _fail(self, "alpha_pattern", f"alpha {a!r} for {key!r} is not a number", "fix that entry")
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = sorted(set(self.target_modules))
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]

    def rank_for(self, module_name: str) -> int:
        return _pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return _pattern_value(self.alpha_pattern, module_name, self.alpha)

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


@dataclass
class IA3Config(AdapterConfig):
    """(IA)³: learned vectors that rescale activations (Liu et al. 2022), with PEFT's targeting.

    Attention targets scale their output, h = l ⊙ (W x + b); `feedforward_modules` (the layer after the
    activation: down_proj, fc2, wo, GPT-2 mlp.c_proj, BERT output.dense) scale their input, h = W (l ⊙ x) + b.
    target_modules / feedforward_modules: lists of module names, regexes, or None for the model family's
    defaults (keys, values and the feed-forward output layer). feedforward_modules must lie within
    target_modules. init_weights=True starts every vector at ones (the identity).
    """

    method: ClassVar[str] = "ia3"
    aliases: ClassVar[dict[str, str]] = {"init_ia3_weights": "init_weights"}

    target_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    modules_to_save: list[str] | None = None
    fan_in_fan_out: bool | None = None
    init_weights: bool = True
    init_ia3_weights: bool | None = field(default=None, repr=False, compare=False)

    def validate(self) -> None:
        for name in ("target_modules", "feedforward_modules", "exclude_modules"):
            _check_targets(self, name, getattr(self, name))
        if self.target_modules == "all-linear" or self.feedforward_modules == "all-linear":
            _fail(self, "target_modules", '"all-linear" is not defined for IA3 (which layers scale their input?)',
                  "name the modules, e.g. target_modules=['k_proj', 'v_proj', 'down_proj'], "
                  "feedforward_modules=['down_proj']")
        if self.feedforward_modules is not None and self.target_modules is None:
            _fail(self, "feedforward_modules", "was given without target_modules",
                  "give target_modules too (feedforward_modules must be among them), or neither for the defaults")
        if isinstance(self.target_modules, (list, tuple, set)) and isinstance(self.feedforward_modules,
                                                                              (list, tuple, set)):
            outside = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if outside:
                _fail(self, "feedforward_modules", f"{outside} are not in target_modules {sorted(self.target_modules)}",
                      "add them to target_modules, or remove them from feedforward_modules")
        if self.init_weights not in (True, False):
            _fail(self, "init_weights", f"got {self.init_weights!r}", "use True (vectors of ones) or False")
        _check_targets(self, "modules_to_save", self.modules_to_save if not isinstance(self.modules_to_save, str)
                       else [self.modules_to_save])
        _check_layers(self, "layers_to_transform", self.layers_to_transform)
        for name in ("target_modules", "feedforward_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple, set)):
                setattr(self, name, sorted(set(value)))
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]


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
    aliases: ClassVar[dict[str, str]] = {"lora_alpha": "alpha", "lora_dropout": "dropout",
                                         "init_lora_weights": "init_weights"}

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
                _fail(self, name, f"must be a positive integer, got {value!r}", f"use e.g. {name}=8")
        if self.target_r > self.init_r:
            _fail(self, "target_r", f"target_r={self.target_r} is above init_r={self.init_r}; the budget only "
                  "falls", "choose target_r <= init_r")
        if isinstance(self.total_step, bool) or not isinstance(self.total_step, int) or self.total_step <= 0:
            _fail(self, "total_step", f"must be the number of training steps (> 0), got {self.total_step!r}",
                  "pass total_step=len(dataloader) * epochs")
        for name in ("tinit", "tfinal"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                _fail(self, name, f"must be a non-negative integer, got {value!r}", f"use e.g. {name}=0")
        if self.tinit >= self.total_step - self.tfinal:
            _fail(self, "tinit", f"tinit={self.tinit} leaves no steps to prune the budget before "
                  f"total_step - tfinal = {self.total_step - self.tfinal}",
                  "lower tinit or tfinal, or raise total_step")
        if isinstance(self.deltaT, bool) or not isinstance(self.deltaT, int) or self.deltaT < 1:
            _fail(self, "deltaT", f"must be a positive integer, got {self.deltaT!r}", "use e.g. deltaT=10")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
                _fail(self, name, f"must be in (0, 1), got {value!r}", f"use e.g. {name}=0.85")
        if not isinstance(self.orth_reg_weight, (int, float)) or self.orth_reg_weight < 0:
            _fail(self, "orth_reg_weight", f"must be >= 0, got {self.orth_reg_weight!r}", "use e.g. 0.5, or 0 for none")
        _check_alpha_dropout(self)
        if self.init_weights not in (True, False):
            _fail(self, "init_weights", f"got {self.init_weights!r}", "use True (E = 0: the identity) or False")
        _check_targets(self, "target_modules", self.target_modules)
        _check_targets(self, "exclude_modules", self.exclude_modules)
        _check_targets(self, "modules_to_save", self.modules_to_save if not isinstance(self.modules_to_save, str)
                       else [self.modules_to_save])
        _check_layers(self, "layers_to_transform", self.layers_to_transform)
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = sorted(set(self.target_modules))
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]

    def scaling(self) -> float:
        """PEFT's AdaLoRA scale: alpha (or init_r when alpha is 0) over the initial rank (+1e-5)."""
        return (self.alpha if self.alpha > 0 else float(self.init_r)) / (self.init_r + 1e-5)


def _pattern_value(pattern: dict, module_name: str, default):
    """PEFT's rank_pattern/alpha_pattern: the first key (a regex) that matches a dotted suffix of the module path."""
    for key, value in pattern.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", module_name):
            return value
    return default


CONFIGS: dict[str, type[AdapterConfig]] = {cls.method: cls for cls in (LoRAConfig, IA3Config, AdaLoRAConfig)}


def config_from_dict(data: dict[str, Any]) -> AdapterConfig:
    """The config a `to_dict()` output describes."""
    method = data.get("method")
    if method not in CONFIGS:
        raise ConfigError(f"config method {method!r} is not known; known methods: {', '.join(sorted(CONFIGS))}.")
    return CONFIGS[method].from_dict(data)
