"""The IA3 config."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ._base import AdapterConfig
from ._checks import check_flags, check_layers, check_layers_pattern, check_targets, fail


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
            check_targets(self, name, getattr(self, name))
        if self.target_modules == "all-linear" or self.feedforward_modules == "all-linear":
            fail(self, "target_modules", '"all-linear" is not defined for IA3 (which layers scale their input?)',
                 "name the modules, e.g. target_modules=['k_proj', 'v_proj', 'down_proj'], "
                 "feedforward_modules=['down_proj']")
        if self.feedforward_modules is not None and self.target_modules is None:
            fail(self, "feedforward_modules", "was given without target_modules",
                 "give target_modules too (feedforward_modules must be among them), or neither for the defaults")
        if isinstance(self.target_modules, (list, tuple, set)) and isinstance(self.feedforward_modules,
                                                                              (list, tuple, set)):
            outside = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if outside:
                fail(self, "feedforward_modules", f"{outside} are not in target_modules {sorted(self.target_modules)}",
                     "add them to target_modules, or remove them from feedforward_modules")
        if self.init_weights not in (True, False):
            fail(self, "init_weights", f"got {self.init_weights!r}", "use True (vectors of ones) or False")
        check_targets(self, "modules_to_save", self.modules_to_save if not isinstance(self.modules_to_save, str)
                      else [self.modules_to_save])
        check_layers(self, "layers_to_transform", self.layers_to_transform)
        check_layers_pattern(self)
        check_flags(self, "fan_in_fan_out", optional=("fan_in_fan_out",))
        for name in ("target_modules", "feedforward_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple, set)):
                setattr(self, name, sorted(set(value)))
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
