"""Bottleneck adapters (AdapterHub's BnConfig and its presets), Compacter and invertible adapters."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ._base import AdapterConfig
from ._checks import check_dropout, check_leave_out, check_non_linearity, fail


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
            fail(self, "output_adapter", "mh_adapter, output_adapter and inv_adapter are all off: no adapter",
                 "set output_adapter=True (after the feed-forward block) or mh_adapter=True")
        factors = self.reduction_factor
        factors = factors if isinstance(factors, dict) else {"default": factors}
        for key, factor in factors.items():
            if key != "default" and not (isinstance(key, str) and key.isdigit()):
                fail(self, "reduction_factor", f"key {key!r} is neither a layer index (as a string) nor 'default'",
                     "use e.g. {'0': 8, 'default': 16}")
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
                fail(self, "reduction_factor", f"{factor!r} (for {key!r}) is not a positive number",
                     "use e.g. reduction_factor=16 (bottleneck = hidden // 16)")
        if isinstance(self.reduction_factor, dict) and "default" not in self.reduction_factor:
            fail(self, "reduction_factor", "a mapping needs a 'default' entry for the layers it does not name",
                 "add 'default': 16")
        check_non_linearity(self)
        if self.init_weights == "mam":
            self.init_weights = "mam_adapter"
        if self.init_weights not in ("bert", "mam_adapter", "houlsby"):
            fail(self, "init_weights", f"{self.init_weights!r} is not an initialisation", "use bert, mam or houlsby")
        if not (self.scaling in ("learned", "channel") or (isinstance(self.scaling, (int, float))
                                                             and not isinstance(self.scaling, bool))):
            fail(self, "scaling", f"got {self.scaling!r}", 'use a number, "learned" or "channel"')
        if self.residual_before_ln not in (True, False, "post_add"):
            fail(self, "residual_before_ln", f"got {self.residual_before_ln!r}", 'use True, False or "post_add"')
        if self.inv_adapter not in (None, "nice", "glow"):
            fail(self, "inv_adapter", f"{self.inv_adapter!r} is not an invertible adapter", 'use "nice" or "glow"')
        if self.inv_adapter and not (isinstance(self.inv_adapter_reduction_factor, (int, float))
                                     and self.inv_adapter_reduction_factor > 0):
            fail(self, "inv_adapter_reduction_factor", f"got {self.inv_adapter_reduction_factor!r}",
                 "use a positive number, e.g. 2")
        check_leave_out(self)
        check_dropout(self)
        for name in ("phm_dim", "phm_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(self, name, f"must be a positive integer, got {value!r}", f"use e.g. {name}=4")
        if self.phm_c_init not in ("normal", "uniform"):
            fail(self, "phm_c_init", f"got {self.phm_c_init!r}", 'use "normal" or "uniform"')
        if self.hypercomplex_nonlinearity not in ("glorot-normal", "glorot-uniform", "normal"):
            fail(self, "hypercomplex_nonlinearity", f"got {self.hypercomplex_nonlinearity!r}",
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
