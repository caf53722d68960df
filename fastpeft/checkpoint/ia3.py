"""IA3 adapters in PEFT's on-disk format (peft_type "IA3").

Tensor keys: "base_model.model." + module path + ".ia3_l", shaped (out, 1) for layers that scale their output
and (1, in) for feed-forward layers that scale their input (fastpeft keeps the vectors flat), plus
".<key>" for each state_dict entry of a `modules_to_save` copy.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import IA3Config
from ..errors import CheckpointError
from ..inject import ia3 as ia3_inject
from .files import (add_and_fill, check_fields, check_tensors, fill_saved, in_out, peft_modules_to_save,
                    peft_target_modules, plan_for_checkpoint, present_modules_to_save, read_tensors,
                    saved_copy_tensors, saved_requirements, short_names)

_FIELDS = {"target_modules": "target_modules", "feedforward_modules": "feedforward_modules",
           "exclude_modules": "exclude_modules", "modules_to_save": "modules_to_save",
           "init_ia3_weights": "init_weights"}
_IGNORED = {"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
            "inference_mode", "fan_in_fan_out"}


def _peft_suffix(name: str, keys) -> bool:
    """PEFT's feed-forward test for a list: a plain suffix test, no dot boundary."""
    return any(name.endswith(k) for k in keys)


def export(model: nn.Module, name: str, config: IA3Config, targets: list[str], saved: list[str]
           ) -> tuple[dict[str, torch.Tensor], dict]:
    """PEFT's tensors (keys without the prefix) and adapter_config.json fields for IA3 adapter `name`."""
    tensors: dict[str, torch.Tensor] = {}
    feedforward = []
    for path in targets:
        layer = model.get_submodule(path)
        vector = layer.ia3_l[name]
        tensors[f"{path}.ia3_l"] = vector[None, :] if layer.is_feedforward else vector[:, None]
        if layer.is_feedforward:
            feedforward.append(path)
    tensors.update(saved_copy_tensors(model, name, saved))
    target_modules = peft_target_modules(model, targets, saved, config.layers_to_transform)
    ff_modules = short_names(feedforward, targets, _peft_suffix) if feedforward else []
    if not set(ff_modules) <= set(target_modules):  # PEFT requires feedforward_modules ⊆ target_modules
        target_modules, ff_modules = sorted(targets), sorted(feedforward)
    base_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    fields = {
        "peft_type": "IA3", "task_type": None, "base_model_name_or_path": base_name, "revision": None,
        "inference_mode": True, "target_modules": target_modules, "feedforward_modules": ff_modules,
        "exclude_modules": None, "modules_to_save": peft_modules_to_save(model, saved),
        "init_ia3_weights": config.init_weights,
        "fan_in_fan_out": any(model.get_submodule(p).fan_in_fan_out for p in targets),
    }
    return tensors, fields


def load(model: nn.Module, name: str, raw: dict, config_path: str, weights_path: str) -> nn.Module:
    """Add IA3 adapter `name` from a checkpoint (PEFT's or fastpeft's) whose config `raw` was read already."""
    check_fields(raw, set(_FIELDS), _IGNORED, config_path, "IA3")
    kwargs = {ours: raw[theirs] for theirs, ours in _FIELDS.items() if raw.get(theirs) is not None}
    kwargs["modules_to_save"] = present_modules_to_save(model, kwargs.get("modules_to_save"))
    if kwargs.get("feedforward_modules") == []:
        kwargs["feedforward_modules"] = None if "target_modules" not in kwargs else []
    try:
        config = IA3Config(**kwargs)
    except (ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"load_adapter: {config_path} holds an IA3 config fastpeft cannot use: {exc}") from None
    tensors, prefix = read_tensors(weights_path)
    plan = plan_for_checkpoint(ia3_inject.plan, model, name, config, config_path, raw)
    required = saved_requirements(model, plan.saved)
    for path, ff in plan.targets:
        in_f, out_f = in_out(model.get_submodule(path))
        shape, what = ((1, in_f), f"(1, in_features) of feed-forward {path}") if ff else (
            (out_f, 1), f"(out_features, 1) of {path}")
        required[f"{path}.ia3_l"] = ("ia3_l", path, shape, what, None)
    check_tensors(tensors, required, weights_path, prefix, model,
                  "the adapter was saved from a base model with other layer sizes, or with other feedforward_modules")

    def fill(undo):
        for key, (kind, where, _, _, _) in required.items():
            if kind == "ia3_l":
                model.get_submodule(where).ia3_l[name].copy_(tensors[key].flatten())
            else:
                fill_saved(model, name, where, tensors[key])

    add_and_fill(model, name, config, fill)
    return model
