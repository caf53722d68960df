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


# AdapterHub's `non_linearity` names that fastpeft computes (fastpeft/reference/bottleneck.py ACTIVATIONS)
NON_LINEARITIES = ("gelu", "gelu_new", "gelu_pytorch_tanh", "leaky_relu", "leakyrelu", "linear", "relu", "sigmoid",
                   "silu", "swish", "tanh")


@dataclass
class BnConfig(AdapterConfig):
    """Bottleneck adapters with AdapterHub `adapters`' option names and defaults (its `BnConfig`), so that its
    users find what they know and its checkpoints map field for field.

    h ← W_up · f(W_down · h) · scaling + residual, after the attention sub-layer (`mh_adapter`) and/or the
    feed-forward sub-layer (`output_adapter`); bottleneck width = hidden // reduction_factor (a number, or a
    mapping from layer index (as a string) to a number with a "default"); `is_parallel` adds it beside the
    sub-layer instead of after it; `phm_layer` makes both projections PHM (Compacter) layers.
    """

    method: ClassVar[str] = "bottleneck"

    mh_adapter: bool = False
    output_adapter: bool = True
    reduction_factor: float | dict = 16
    non_linearity: str = "relu"
    original_ln_before: bool = False
    original_ln_after: bool = True
    ln_before: bool = False
    ln_after: bool = False
    init_weights: str = "bert"
    init_weights_seed: int | None = None
    is_parallel: bool = False
    scaling: float | str = 1.0
    use_gating: bool = False
    residual_before_ln: bool | str = True
    adapter_residual_before_ln: bool = False
    inv_adapter: str | None = None
    inv_adapter_reduction_factor: float | None = None
    cross_adapter: bool = False
    leave_out: list[int] = field(default_factory=list)
    dropout: float = 0.0
    phm_layer: bool = False
    phm_dim: int = 4
    factorized_phm_W: bool = True
    shared_W_phm: bool = False
    shared_phm_rule: bool = True
    factorized_phm_rule: bool = False
    phm_c_init: str = "normal"
    phm_init_range: float = 0.0001
    learn_phm: bool = True
    hypercomplex_nonlinearity: str = "glorot-uniform"
    phm_rank: int = 1
    phm_bias: bool = True
    stochastic_depth: float = 0.0

    def validate(self) -> None:
        if not (self.mh_adapter or self.output_adapter or self.inv_adapter):
            _fail(self, "output_adapter", "mh_adapter, output_adapter and inv_adapter are all off: no adapter",
                  "set output_adapter=True (after the feed-forward block) or mh_adapter=True")
        factors = self.reduction_factor
        factors = factors if isinstance(factors, dict) else {"default": factors}
        for key, factor in factors.items():
            if key != "default" and not (isinstance(key, str) and key.isdigit()):
                _fail(self, "reduction_factor", f"key {key!r} is neither a layer index (as a string) nor 'default'",
                      "use e.g. {'0': 8, 'default': 16}")
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
                _fail(self, "reduction_factor", f"{factor!r} (for {key!r}) is not a positive number",
                      "use e.g. reduction_factor=16 (bottleneck = hidden // 16)")
        if isinstance(self.reduction_factor, dict) and "default" not in self.reduction_factor:
            _fail(self, "reduction_factor", "a mapping needs a 'default' entry for the layers it does not name",
                  "add 'default': 16")
        if not isinstance(self.non_linearity, str) or self.non_linearity.lower() not in NON_LINEARITIES:
            _fail(self, "non_linearity", f"{self.non_linearity!r} is not supported",
                  f"use one of {', '.join(NON_LINEARITIES)}")
        if self.init_weights == "mam":
            self.init_weights = "mam_adapter"
        if self.init_weights not in ("bert", "mam_adapter", "houlsby"):
            _fail(self, "init_weights", f"{self.init_weights!r} is not an initialisation", "use bert, mam or houlsby")
        if not (self.scaling in ("learned", "channel") or (isinstance(self.scaling, (int, float))
                                                             and not isinstance(self.scaling, bool))):
            _fail(self, "scaling", f"got {self.scaling!r}", 'use a number, "learned" or "channel"')
        if self.residual_before_ln not in (True, False, "post_add"):
            _fail(self, "residual_before_ln", f"got {self.residual_before_ln!r}", 'use True, False or "post_add"')
        if self.inv_adapter not in (None, "nice", "glow"):
            _fail(self, "inv_adapter", f"{self.inv_adapter!r} is not an invertible adapter", 'use "nice" or "glow"')
        if self.inv_adapter and not (isinstance(self.inv_adapter_reduction_factor, (int, float))
                                     and self.inv_adapter_reduction_factor > 0):
            _fail(self, "inv_adapter_reduction_factor", f"got {self.inv_adapter_reduction_factor!r}",
                  "use a positive number, e.g. 2")
        _check_leave_out(self)
        _check_dropout(self)
        for name in ("phm_dim", "phm_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                _fail(self, name, f"must be a positive integer, got {value!r}", f"use e.g. {name}=4")
        if self.phm_c_init not in ("normal", "uniform"):
            _fail(self, "phm_c_init", f"got {self.phm_c_init!r}", 'use "normal" or "uniform"')
        if self.hypercomplex_nonlinearity not in ("glorot-normal", "glorot-uniform", "normal"):
            _fail(self, "hypercomplex_nonlinearity", f"got {self.hypercomplex_nonlinearity!r}",
                  'use "glorot-uniform", "glorot-normal" or "normal"')


@dataclass
class SeqBnConfig(BnConfig):
    """Pfeiffer et al. (2020): one sequential adapter after the feed-forward block, after its layer norm."""

    original_ln_before: bool = True
    reduction_factor: float | dict = 16
    non_linearity: str = "relu"


@dataclass
class DoubleSeqBnConfig(BnConfig):
    """Houlsby et al. (2019): sequential adapters after the attention and after the feed-forward block."""

    mh_adapter: bool = True
    non_linearity: str = "swish"


@dataclass
class ParBnConfig(BnConfig):
    """He et al. (2021): a parallel adapter beside the feed-forward block, scaled by 4."""

    reduction_factor: float | dict = 2
    init_weights: str = "mam_adapter"
    is_parallel: bool = True
    scaling: float | str = 4.0


@dataclass
class SeqBnInvConfig(SeqBnConfig):
    """Pfeiffer adapters plus an invertible (NICE) adapter on the embeddings (MAD-X language adapters)."""

    inv_adapter: str | None = "nice"
    inv_adapter_reduction_factor: float | None = 2


@dataclass
class DoubleSeqBnInvConfig(DoubleSeqBnConfig):
    """Houlsby adapters plus an invertible (NICE) adapter on the embeddings."""

    inv_adapter: str | None = "nice"
    inv_adapter_reduction_factor: float | None = 2


@dataclass
class CompacterConfig(DoubleSeqBnConfig):
    """Compacter (Mahabadi et al. 2021): Houlsby placement with PHM (Kronecker-sum) projections."""

    phm_layer: bool = True
    reduction_factor: float | dict = 32
    non_linearity: str = "gelu"


@dataclass
class CompacterPlusPlusConfig(SeqBnConfig):
    """Compacter++: Pfeiffer placement with PHM projections."""

    phm_layer: bool = True
    reduction_factor: float | dict = 32
    non_linearity: str = "gelu"


def _check_int(cfg, name: str, low: int, example: str, *, optional: bool = False) -> None:
    value = getattr(cfg, name)
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        _fail(cfg, name, f"must be an integer >= {low}, got {value!r}", f"use e.g. {name}={example}")


def _check_dropout(cfg, name: str = "dropout") -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        _fail(cfg, name, f"must be in [0, 1), got {value!r}", f"use e.g. {name}=0.1, or 0.0")


def _check_leave_out(cfg) -> None:
    if not isinstance(cfg.leave_out, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in cfg.leave_out):
        _fail(cfg, "leave_out", f"got {cfg.leave_out!r}", "list the layer indices to skip, e.g. [0, 1]")
    cfg.leave_out = list(cfg.leave_out)


@dataclass
class PrefixTuningConfig(AdapterConfig):
    """Prefix tuning (Li & Liang 2021) with AdapterHub's options: every attention layer attends to
    `prefix_length` learned keys and values before the real ones,

        O = softmax(Q [P_K; K]ᵀ · scale + mask) [P_V; V]   (fp.ops.prefix_attention; K and V never copied)

    The prefix of every layer comes from one MLP per attention kind (flat=False: P_K, P_V = W_2 f(W_1 E + b_1) + b_2
    over a P x hidden embedding E, bottleneck `bottleneck_size`, f = `non_linearity`), or is a parameter itself
    (flat=True; fp.eject_prefix_tuning turns the first into the second). Encoder-decoder models: `encoder_prefix`
    for the encoder's self-attention, `cross_prefix` for the decoder's cross-attention (the decoder's
    self-attention always gets one). `use_gating`: the prefix keys and values are scaled by mean_t sigmoid(W h_t + b)
    over the layer's input tokens (one gate for both when `shared_gating`, else one each).
    `shift_positions`: real tokens sit at positions P..P+L-1 as in PEFT (set when a PEFT checkpoint is loaded; on
    T5 the prefix keys then get the relative position bias of positions 0..P-1); by default real tokens keep
    0..L-1 and the prefix carries no position. `modules_to_save`: modules (e.g. a
    classification head) trained beside the prefix, as in PEFT.
    """

    method: ClassVar[str] = "prefix_tuning"
    aliases: ClassVar[dict[str, str]] = {"num_virtual_tokens": "prefix_length"}

    prefix_length: int = 30
    bottleneck_size: int = 512
    non_linearity: str = "tanh"
    dropout: float = 0.0
    flat: bool = False
    encoder_prefix: bool = True
    cross_prefix: bool = True
    leave_out: list[int] = field(default_factory=list)
    use_gating: bool = False
    shared_gating: bool = True
    shift_positions: bool = False
    modules_to_save: list[str] | None = None
    init_weights_seed: int | None = None
    num_virtual_tokens: int | None = field(default=None, repr=False, compare=False)

    def validate(self) -> None:
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        _check_targets(self, "modules_to_save", self.modules_to_save)
        _check_int(self, "prefix_length", 1, "30")
        _check_int(self, "bottleneck_size", 1, "512")
        if not isinstance(self.non_linearity, str) or self.non_linearity.lower() not in NON_LINEARITIES:
            _fail(self, "non_linearity", f"{self.non_linearity!r} is not supported",
                  f"use one of {', '.join(NON_LINEARITIES)}")
        _check_dropout(self)
        for name in ("flat", "encoder_prefix", "cross_prefix", "use_gating", "shared_gating", "shift_positions"):
            if getattr(self, name) not in (True, False):
                _fail(self, name, f"must be True or False, got {getattr(self, name)!r}", f"use {name}=True or False")
        _check_int(self, "init_weights_seed", 0, "42", optional=True)
        _check_leave_out(self)


@dataclass
class PromptTuningConfig(AdapterConfig):
    """Prompt tuning (Lester et al. 2021) with AdapterHub's options: `prompt_length` learned embeddings are put
    before the input embeddings (combine="prefix") or after its first token (combine="prefix_after_bos"); the
    attention mask and labels (-100) are extended to match. prompt_init="random_uniform" draws them from
    U(-random_uniform_scale, random_uniform_scale); "from_string" copies the model's own token embeddings of
    `prompt_init_text` (tokenized by `tokenizer`, or AutoTokenizer(`tokenizer_name_or_path`)), repeated or cut to
    prompt_length. modules_to_save: modules trained whole beside the prompt (PEFT's; e.g. ["classifier"]).
    """

    method: ClassVar[str] = "prompt_tuning"
    aliases: ClassVar[dict[str, str]] = {"num_virtual_tokens": "prompt_length",
                                         "prompt_tuning_init_text": "prompt_init_text"}

    prompt_length: int = 10
    prompt_init: str = "random_uniform"
    prompt_init_text: str | None = None
    random_uniform_scale: float = 0.5
    combine: str = "prefix"
    tokenizer_name_or_path: str | None = None
    tokenizer: Any = field(default=None, repr=False, compare=False)
    init_weights_seed: int | None = None
    modules_to_save: list[str] | None = None
    num_virtual_tokens: int | None = field(default=None, repr=False, compare=False)
    prompt_tuning_init_text: str | None = field(default=None, repr=False, compare=False)

    def validate(self) -> None:
        _check_int(self, "prompt_length", 1, "10")
        if self.prompt_init == "text":  # PEFT's name for it
            self.prompt_init = "from_string"
        if self.prompt_init not in ("random_uniform", "from_string"):
            _fail(self, "prompt_init", f"got {self.prompt_init!r}", 'use "random_uniform" or "from_string"')
        if self.prompt_init == "from_string" and not (isinstance(self.prompt_init_text, str) and self.prompt_init_text):
            _fail(self, "prompt_init_text", 'is missing: prompt_init="from_string" initialises the prompt from the '
                  "embeddings of a text", 'pass prompt_init_text="Classify the sentiment:" (and a tokenizer), or '
                  'use prompt_init="random_uniform"')
        if isinstance(self.random_uniform_scale, bool) or not isinstance(self.random_uniform_scale, (int, float)) \
                or not self.random_uniform_scale > 0:
            _fail(self, "random_uniform_scale", f"got {self.random_uniform_scale!r}", "use a positive number, e.g. 0.5")
        if self.combine not in ("prefix", "prefix_after_bos"):
            _fail(self, "combine", f"got {self.combine!r}", 'use "prefix" or "prefix_after_bos"')
        _check_int(self, "init_weights_seed", 0, "42", optional=True)
        _check_modules_to_save(self)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("tokenizer")  # an object, not part of the saved config
        return out


@dataclass
class PTuningConfig(AdapterConfig):
    """P-tuning (Liu et al. 2021, PEFT's PromptEncoderConfig): `prompt_length` virtual token embeddings produced by a
    prompt encoder from learned inputs E: encoder_type="MLP": W_3 relu(W_2 relu(W_1 E)) (hidden width
    `encoder_hidden_size`, default the model's hidden size); "LSTM": a bidirectional `encoder_num_layers`-layer
    LSTM over E, then W_2 relu(W_1 ·). Combined with the input as prompt tuning's combine="prefix".
    inference_mode=True (PEFT's name): no encoder, the virtual token embeddings are learned directly; a loaded
    checkpoint is such an adapter, because a saved P-tuning adapter holds the encoder's output (as PEFT's).
    modules_to_save: modules trained whole beside the prompt (PEFT's; e.g. ["classifier"]).
    """

    method: ClassVar[str] = "p_tuning"
    aliases: ClassVar[dict[str, str]] = {"num_virtual_tokens": "prompt_length",
                                         "encoder_reparameterization_type": "encoder_type"}

    prompt_length: int = 20
    encoder_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0
    init_weights_seed: int | None = None
    modules_to_save: list[str] | None = None
    inference_mode: bool = False
    num_virtual_tokens: int | None = field(default=None, repr=False, compare=False)
    encoder_reparameterization_type: str | None = field(default=None, repr=False, compare=False)

    def validate(self) -> None:
        _check_int(self, "prompt_length", 1, "20")
        if isinstance(self.encoder_type, str):
            self.encoder_type = self.encoder_type.upper()
        if self.encoder_type not in ("MLP", "LSTM"):
            _fail(self, "encoder_type", f"got {self.encoder_type!r}", 'use "MLP" or "LSTM"')
        _check_int(self, "encoder_hidden_size", 1, "256", optional=True)
        _check_int(self, "encoder_num_layers", 1, "2")
        _check_dropout(self, "encoder_dropout")
        _check_int(self, "init_weights_seed", 0, "42", optional=True)
        _check_modules_to_save(self)
        if not isinstance(self.inference_mode, bool):
            _fail(self, "inference_mode", f"got {self.inference_mode!r}", "use True or False")


def _check_modules_to_save(cfg) -> None:
    if isinstance(cfg.modules_to_save, str):
        cfg.modules_to_save = [cfg.modules_to_save]
    if cfg.modules_to_save is not None:
        _check_targets(cfg, "modules_to_save", list(cfg.modules_to_save))
        cfg.modules_to_save = list(dict.fromkeys(cfg.modules_to_save))


@dataclass
class LlamaAdapterConfig(AdapterConfig):
    """LLaMA-Adapter (Zhang et al. 2023; PEFT's AdaptionPromptConfig): in the top `adapter_layers` layers (None: all),
    `adapter_len` learned prompt tokens A give keys and values through the layer's own k/v projections (no
    position), attended with their own softmax and added under a zero-initialised gate g per layer:

        O = attention(Q, K, V) + g · softmax(Q (A W_k)ᵀ · scale) (A W_v)      (identity at g = 0)
    """

    method: ClassVar[str] = "llama_adapter"

    adapter_len: int = 10
    adapter_layers: int | None = None
    init_weights_seed: int | None = None

    def validate(self) -> None:
        _check_int(self, "adapter_len", 1, "10")
        _check_int(self, "adapter_layers", 1, "8", optional=True)
        _check_int(self, "init_weights_seed", 0, "42", optional=True)


def _pattern_value(pattern: dict, module_name: str, default):
    """PEFT's rank_pattern/alpha_pattern: the first key (a regex) that matches a dotted suffix of the module path."""
    for key, value in pattern.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", module_name):
            return value
    return default


CONFIGS: dict[str, type[AdapterConfig]] = {cls.method: cls for cls in (
    LoRAConfig, IA3Config, AdaLoRAConfig, BnConfig, PrefixTuningConfig, PromptTuningConfig, PTuningConfig,
    LlamaAdapterConfig)}


def config_from_dict(data: dict[str, Any]) -> AdapterConfig:
    """The config a `to_dict()` output describes."""
    method = data.get("method")
    if method not in CONFIGS:
        raise ConfigError(f"config method {method!r} is not known; known methods: {', '.join(sorted(CONFIGS))}.")
    return CONFIGS[method].from_dict(data)
