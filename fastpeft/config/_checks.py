"""Field validators shared by the configs: each error names the config, the field and the fix."""
from __future__ import annotations

import math
import re

from ..errors import ConfigError

# AdapterHub's `non_linearity` names that fastpeft computes (fastpeft/reference/bottleneck.py ACTIVATIONS)
NON_LINEARITIES = ("gelu", "gelu_new", "gelu_pytorch_tanh", "leaky_relu", "leakyrelu", "linear", "relu", "sigmoid",
                   "silu", "swish", "tanh")


def fail(cfg, field_name: str, problem: str, fix: str) -> None:
    raise ConfigError(f"{type(cfg).__name__}.{field_name}: {problem}; {fix}.")


def check_targets(cfg, name: str, value) -> None:
    if value is None or isinstance(value, str):
        if isinstance(value, str) and value != "all-linear":
            try:
                re.compile(value)
            except re.error as exc:
                fail(cfg, name, f"{value!r} is not a valid regular expression ({exc})",
                     "pass a list of module names or a valid regex")
        return
    if not isinstance(value, (list, tuple, set)) or not all(isinstance(v, str) and v for v in value):
        fix = 'pass a list of module names, a regex string, or "all-linear"' if name == "target_modules" else \
            "pass a list of module names or a regex string"
        fail(cfg, name, f"got {value!r}", fix)


def check_layers(cfg, name: str, value) -> None:
    if value is None:
        return
    values = [value] if isinstance(value, int) else value
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                        for v in values):
        fail(cfg, name, f"got {value!r}", "pass a layer index or a list of non-negative layer indices")


def check_layers_pattern(cfg) -> None:
    value = cfg.layers_pattern
    if value is None or (isinstance(value, str) and value):
        return
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
        fail(cfg, "layers_pattern", f"got {value!r}", "pass the name of the ModuleList that holds the transformer "
             "blocks (e.g. 'layers', or 'h' in GPT-2), a list of such names, or None")


def check_flags(cfg, *names: str, optional: tuple[str, ...] = ()) -> None:
    """Boolean fields (those in `optional` may also be None)."""
    for name in names:
        value = getattr(cfg, name)
        if value not in (True, False) and not (value is None and name in optional):
            fail(cfg, name, f"must be True or False, got {value!r}",
                 f"use {name}=True or False{' (or None)' if name in optional else ''}")


def check_alpha_dropout(cfg) -> None:
    if isinstance(cfg.alpha, bool) or not isinstance(cfg.alpha, (int, float)) or not math.isfinite(cfg.alpha):
        fail(cfg, "alpha", f"must be a finite number, got {cfg.alpha!r}", "use e.g. alpha=16")
    if not isinstance(cfg.dropout, (int, float)) or not 0.0 <= cfg.dropout < 1.0:
        fail(cfg, "dropout", f"must be in [0, 1), got {cfg.dropout!r}", "use e.g. dropout=0.05, or 0.0")


def check_int(cfg, name: str, low: int, example: str, *, optional: bool = False) -> None:
    value = getattr(cfg, name)
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        fail(cfg, name, f"must be an integer >= {low}, got {value!r}", f"use e.g. {name}={example}")


def check_dropout(cfg, name: str = "dropout") -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        fail(cfg, name, f"must be in [0, 1), got {value!r}", f"use e.g. {name}=0.1, or 0.0")


def check_leave_out(cfg) -> None:
    if not isinstance(cfg.leave_out, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in cfg.leave_out):
        fail(cfg, "leave_out", f"got {cfg.leave_out!r}", "list the layer indices to skip, e.g. [0, 1]")
    cfg.leave_out = list(cfg.leave_out)


def check_modules_to_save(cfg) -> None:
    if isinstance(cfg.modules_to_save, str):
        cfg.modules_to_save = [cfg.modules_to_save]
    if cfg.modules_to_save is not None:
        check_targets(cfg, "modules_to_save", list(cfg.modules_to_save))
        cfg.modules_to_save = list(dict.fromkeys(cfg.modules_to_save))


def pattern_value(pattern: dict, module_name: str, default):
    """PEFT's rank_pattern/alpha_pattern: the first key (a regex) that matches a dotted suffix of the module path."""
    for key, value in pattern.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", module_name):
            return value
    return default


def check_non_linearity(cfg, name: str = "non_linearity") -> None:
    value = getattr(cfg, name)
    if not isinstance(value, str) or value.lower() not in NON_LINEARITIES:
        fail(cfg, name, f"{value!r} is not supported", f"use one of {', '.join(NON_LINEARITIES)}")
