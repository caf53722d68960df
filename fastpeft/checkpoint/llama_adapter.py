"""LLaMA-Adapter in PEFT's on-disk format (peft_type "ADAPTION_PROMPT", PEFT's AdaptionPromptConfig), both ways.

PEFT wraps each adapted attention module and keeps the prompt and gate on the wrapper, so its checkpoint holds, per
adapted layer, `base_model.model.<attention path>.adaption_prompt` (1, adapter_len, hidden) and
`base_model.model.<attention path>.adaption_gate` (1,); fastpeft keeps them at
`<base model>.llama_adapter.adaption_prompts.<name>.<layer>.{adaption_prompt,adaption_gate}`. The config names
`adapter_len`, `adapter_layers` (PEFT requires a number: the top layers, the last attention modules whose path ends
in `.<target_modules>`) and `target_modules` (the attention module's name in a block: "self_attn").

PEFT adds the prompt's term after the output projection (o_proj(attn) + o_proj(term)), fastpeft before it
(o_proj(attn + term)): the same for families whose o_proj has no bias (Llama, Mistral: PEFT's families).
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import LlamaAdapterConfig
from ..errors import CheckpointError, ConfigError
from ..inject import llama_adapter as inject
from .files import MISMATCH_FIX, add_and_fill, check_fields, plan_for_checkpoint, read_tensors
from .prefix import TASKS

NAMES = ("adaption_prompt", "adaption_gate")
_KNOWN = {"adapter_len", "adapter_layers", "target_modules"}
_IGNORED = {"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
            "inference_mode"}


def _target_modules(plan: inject.LlamaAdapterPlan) -> str:
    """PEFT's target_modules: the attention module's last path segment (it matches paths ending in '.<name>')."""
    return plan.calls[0][0].rsplit(".", 1)[-1]


def _paths(plan: inject.LlamaAdapterPlan) -> dict[int, str]:
    """Adapted layer -> its attention module's path (PEFT's key stem)."""
    return {index: path for path, index in plan.calls if index in plan.layers}


def export(model: nn.Module, name: str, config: LlamaAdapterConfig, targets: list[str], saved: list[str]
           ) -> tuple[dict[str, torch.Tensor], dict]:
    pool = model.get_submodule(targets[0])
    group = pool.adaption_prompts[name]
    plan = inject.plan(model, name, LlamaAdapterConfig(adapter_len=config.adapter_len,
                                                       adapter_layers=len(group.layers)))
    paths = _paths(plan)
    if sorted(paths) != sorted(group.layers):  # cannot happen for an adapter this model holds
        raise CheckpointError(f"save_adapter: adapter {name!r} adapts layers {group.layers}, PEFT's format "
                              f"can only say the top {len(group.layers)} layers {sorted(paths)}.")
    tensors = {f"{paths[layer]}.{key}": getattr(group[str(layer)], key) for layer in group.layers for key in NAMES}
    task = next((t for suffix, t in TASKS if type(model).__name__.endswith(suffix)), None)
    fields = {
        "peft_type": "ADAPTION_PROMPT", "task_type": task, "inference_mode": True, "revision": None,
        "base_model_name_or_path": getattr(model.config, "_name_or_path", None) or None,
        "adapter_len": config.adapter_len, "adapter_layers": len(group.layers),
        "target_modules": _target_modules(plan),
    }
    return tensors, fields


def load(model: nn.Module, name: str, raw: dict, config_path: str, weights_path: str) -> nn.Module:
    check_fields(raw, _KNOWN, _IGNORED, config_path, "ADAPTION_PROMPT")
    try:
        config = LlamaAdapterConfig(adapter_len=raw.get("adapter_len"), adapter_layers=raw.get("adapter_layers"))
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"load_adapter: {config_path} holds an adaption-prompt config fastpeft cannot use: "
                              f"{exc}") from None
    try:
        plan = plan_for_checkpoint(inject.plan, model, name, config, config_path, raw)
    except ConfigError as exc:  # adapter_layers beyond the model's layers
        raise CheckpointError(f"load_adapter: {config_path} does not fit this {type(model).__name__}: {exc}") from None
    target = raw.get("target_modules")
    if target is not None and target != _target_modules(plan):
        raise CheckpointError(f"load_adapter: {config_path} has target_modules={target!r}; this "
                              f"{type(model).__name__}'s attention modules are {_target_modules(plan)!r} "
                              f"(e.g. {plan.calls[0][0]}); the adapter was made for another base model.")
    tensors, prefix = read_tensors(weights_path)
    paths = _paths(plan)
    required = {f"{paths[layer]}.{key}": (layer, key, (1, config.adapter_len, plan.hidden) if key == NAMES[0]
                                          else (1,)) for layer in plan.layers for key in NAMES}
    unexpected = sorted(set(tensors) - set(required))
    missing = sorted(set(required) - set(tensors))
    if unexpected or missing:
        raise CheckpointError(f"load_adapter: {weights_path} does not hold the adaption prompts of the top "
                              f"{len(plan.layers)} layers of this {type(model).__name__}: missing "
                              f"{[prefix + k for k in missing[:4]]}, unexpected {[prefix + k for k in unexpected[:4]]}."
                              f" The weights and the config come from different adapters or base models: {MISMATCH_FIX}.")
    for key, (_, _, shape) in required.items():
        if tuple(tensors[key].shape) != shape:
            raise CheckpointError(f"load_adapter: {weights_path}: tensor {prefix + key!r} has shape "
                                  f"{tuple(tensors[key].shape)}, this model needs {shape} "
                                  "((1, adapter_len, hidden) prompts, (1,) gates).")
        if not tensors[key].is_floating_point():
            raise CheckpointError(f"load_adapter: {weights_path}: tensor {prefix + key!r} has dtype "
                                  f"{tensors[key].dtype}; adaption prompts and gates are floating point.")

    def fill(undo):
        group = model.get_submodule(plan.targets[0][0]).adaption_prompts[name]
        for key, (layer, attr, _) in required.items():
            target = getattr(group[str(layer)], attr)
            target.copy_(tensors[key].to(target.dtype))

    add_and_fill(model, name, config, fill)
    return model
