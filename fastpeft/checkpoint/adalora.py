"""AdaLoRA adapters in PEFT's on-disk format (peft_type "ADALORA").

Tensor keys: "base_model.model." + module path + ".lora_A" (r', in), ".lora_B" (out, r'), ".lora_E" (r', 1), where
r' is the number of ranks the config's `rank_pattern` keeps in that layer (init_r without a pattern): PEFT saves
only the kept singular triplets. Loading puts them back at their positions among init_r ranks, pruned ones zero;
the scale keeps using init_r, as in PEFT.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import AdaLoRAConfig
from ..errors import CheckpointError
from ..inject import adalora as ada_inject
from .files import (add_and_fill, check_fields, check_tensors, fill_saved, in_out, peft_modules_to_save,
                    peft_target_modules, plan_for_checkpoint, present_modules_to_save, read_tensors,
                    saved_copy_tensors, saved_requirements)

_FIELDS = {name: name for name in ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2",
                                   "orth_reg_weight", "total_step", "rank_pattern", "target_modules",
                                   "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save")}
_FIELDS.update({"lora_alpha": "alpha", "lora_dropout": "dropout", "init_lora_weights": "init_weights"})
_IGNORED = {"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
            "inference_mode", "fan_in_fan_out", "r", "megatron_core", "qalora_group_size", "bias"}


def _keep(config: AdaLoRAConfig, path: str, r: int) -> torch.Tensor:
    pattern = (config.rank_pattern or {}).get(f"{path}.lora_E")
    return torch.tensor(pattern, dtype=torch.bool) if pattern is not None else torch.ones(r, dtype=torch.bool)


def export(model: nn.Module, name: str, config: AdaLoRAConfig, targets: list[str], saved: list[str]
           ) -> tuple[dict[str, torch.Tensor], dict]:
    """PEFT's tensors (only the kept ranks) and adapter_config.json fields for AdaLoRA adapter `name`."""
    tensors: dict[str, torch.Tensor] = {}
    for path in targets:
        layer = model.get_submodule(path)
        keep = _keep(config, path, layer.r[name]).to(layer.lora_E[name].device)
        tensors[f"{path}.lora_A"] = layer.lora_A[name][keep]
        tensors[f"{path}.lora_B"] = layer.lora_B[name][:, keep]
        tensors[f"{path}.lora_E"] = layer.lora_E[name][keep][:, None]
    tensors.update(saved_copy_tensors(model, name, saved))
    target_modules = peft_target_modules(model, targets, saved, config.layers_to_transform)
    base_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    alpha = config.alpha
    fields = {
        "peft_type": "ADALORA", "task_type": None, "base_model_name_or_path": base_name, "revision": None,
        "inference_mode": True, "init_r": config.init_r, "target_r": config.target_r, "tinit": config.tinit,
        "tfinal": config.tfinal, "deltaT": config.deltaT, "beta1": config.beta1, "beta2": config.beta2,
        "orth_reg_weight": config.orth_reg_weight, "total_step": config.total_step,
        "rank_pattern": config.rank_pattern, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": config.dropout, "target_modules": target_modules, "exclude_modules": None,
        "layers_to_transform": config.layers_to_transform, "layers_pattern": config.layers_pattern,
        "modules_to_save": peft_modules_to_save(model, saved), "bias": "none",
        "init_lora_weights": config.init_weights, "use_dora": False,
        "fan_in_fan_out": any(model.get_submodule(p).fan_in_fan_out for p in targets),
    }
    return tensors, fields


def load(model: nn.Module, name: str, raw: dict, config_path: str, weights_path: str) -> nn.Module:
    """Add AdaLoRA adapter `name` from a checkpoint (PEFT's or fastpeft's) whose config `raw` was read already."""
    if raw.get("bias", "none") != "none":
        raise CheckpointError(f"load_adapter: {config_path} sets bias={raw['bias']!r}: trained biases are not "
                              "supported for AdaLoRA by fastpeft. Use an adapter with bias=\"none\".")
    check_fields(raw, set(_FIELDS), _IGNORED, config_path, "AdaLoRA")
    kwargs = {ours: raw[theirs] for theirs, ours in _FIELDS.items() if raw.get(theirs) is not None}
    kwargs["modules_to_save"] = present_modules_to_save(model, kwargs.get("modules_to_save"))
    try:
        config = AdaLoRAConfig(**kwargs)
    except (ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"load_adapter: {config_path} holds an AdaLoRA config fastpeft cannot use: {exc}"
                              ) from None
    tensors, prefix = read_tensors(weights_path)
    plan = plan_for_checkpoint(ada_inject.plan, model, name, config, config_path, raw)
    required = saved_requirements(model, plan.saved)
    for path, r, _ in plan.targets:
        keep = _keep(config, path, r)
        if keep.numel() != r:
            raise CheckpointError(f"load_adapter: {config_path}: rank_pattern for {path} has {keep.numel()} entries "
                                  f"but init_r is {r}; the config is inconsistent, save the adapter again.")
        kept = int(keep.sum())
        in_f, out_f = in_out(model.get_submodule(path))
        for kind, shape in (("lora_A", (kept, in_f)), ("lora_B", (out_f, kept)), ("lora_E", (kept, 1))):
            required[f"{path}.{kind}"] = (kind, (path, keep), shape, f"{kind} of {path} ({kept} kept ranks)", None)
    check_tensors(tensors, required, weights_path, prefix, model,
                  "the adapter was saved from a base model with other layer sizes, or with another rank_pattern")

    def fill(undo):
        for key, (kind, where, _, _, _) in required.items():
            if kind == "saved":
                fill_saved(model, name, where, tensors[key])
                continue
            path, keep = where
            layer = model.get_submodule(path)
            param = getattr(layer, kind)[name]
            keep = keep.to(param.device)
            if kind == "lora_B":
                param.zero_()[:, keep] = tensors[key].to(param)
            else:
                param.zero_()[keep] = tensors[key].reshape(param[keep].shape).to(param)

    add_and_fill(model, name, config, fill)
    return model
