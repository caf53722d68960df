"""Prefix tuning in PEFT's on-disk format (peft_type "PREFIX_TUNING"), both ways.

PEFT keeps the prefix in the KV cache, so real tokens sit at positions P..P+L-1; its checkpoint holds one tensor,
`prompt_embeddings` (P, layers·2·H_kv·D): every layer's keys and values in the layout of fastpeft's flat prefix
((P, layers, 2, H_kv, D)). Loading gives a flat adapter with shift_positions=True (PEFT's positions, so outputs
match PEFT's); saving writes the flat prefix an adapter produces (reparameterised or not). PEFT cannot express
gating, leave_out, unshifted positions or encoder-decoder prefixes: such adapters are saved in fastpeft's layout
(checkpoint/adapterhub.py) instead — `peft_compatible` decides.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import PrefixTuningConfig
from ..errors import CheckpointError
from ..inject import prefix as prefix_inject
from .files import (add_and_fill, check_fields, check_tensors, fill_saved, peft_modules_to_save, plan_for_checkpoint,
                    present_modules_to_save, read_safetensors, saved_copy_tensors, saved_requirements)

KEY = "prompt_embeddings"
KEY_PREFIX = ""  # PEFT writes prompt-learning tensors without "base_model.model."
SAVED_PREFIX = "base_model."  # ... and its modules_to_save copies (a task head) as base_model.<path>.<key>
_KNOWN = {"num_virtual_tokens", "num_layers", "num_attention_heads", "token_dim", "num_transformer_submodules",
          "encoder_hidden_size", "prefix_projection", "modules_to_save"}
_IGNORED = {"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
            "inference_mode", "init_weights"}
TASKS = (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
         ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"))


def peft_compatible(model: nn.Module, config: PrefixTuningConfig) -> bool:
    """Whether PEFT's format holds this adapter exactly."""
    return (config.shift_positions and not config.use_gating and not config.leave_out
            and not getattr(model.config, "is_encoder_decoder", False))


def export(model: nn.Module, name: str, config: PrefixTuningConfig, targets: list[str], saved: list[str]
           ) -> tuple[dict[str, torch.Tensor], dict]:
    pool = model.get_submodule(targets[0])
    group = pool.prefix_tunings[name]
    prefix = group["self_prefix"]
    kv, head_dim = prefix_inject.heads_of(model.config)
    task = next((t for suffix, t in TASKS if type(model).__name__.endswith(suffix)), None)
    fields = {
        "peft_type": "PREFIX_TUNING", "task_type": task, "inference_mode": True, "revision": None,
        "base_model_name_or_path": getattr(model.config, "_name_or_path", None) or None,
        "num_virtual_tokens": config.prefix_length, "num_layers": prefix.n_layers, "num_attention_heads": kv,
        "token_dim": kv * head_dim, "num_transformer_submodules": 1, "encoder_hidden_size": config.bottleneck_size,
        "prefix_projection": False, "modules_to_save": peft_modules_to_save(model, saved),
    }
    tensors = {KEY: prefix.flat_prefix().view(config.prefix_length, -1)}
    tensors.update({SAVED_PREFIX + k: v for k, v in saved_copy_tensors(model, name, saved).items()})
    return tensors, fields


def load(model: nn.Module, name: str, raw: dict, config_path: str, weights_path: str) -> nn.Module:
    check_fields(raw, _KNOWN, _IGNORED, config_path, "PREFIX_TUNING")
    if raw.get("num_transformer_submodules", 1) != 1:
        raise CheckpointError(f"load_adapter: {config_path} is an encoder-decoder prefix "
                              f"(num_transformer_submodules={raw['num_transformer_submodules']}); fastpeft reads PEFT "
                              "prefix-tuning checkpoints of decoder-only and encoder-only models.")
    length = raw.get("num_virtual_tokens")
    saved = present_modules_to_save(model, raw.get("modules_to_save"))
    try:
        config = PrefixTuningConfig(prefix_length=length, flat=True, shift_positions=True,
                                    bottleneck_size=raw.get("encoder_hidden_size") or 512,
                                    modules_to_save=list(dict.fromkeys(saved)) if saved else None)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"load_adapter: {config_path} holds a prefix-tuning config fastpeft cannot use: "
                              f"{exc}") from None
    plan = plan_for_checkpoint(prefix_inject.plan, model, name, config, config_path, raw)
    layers = len(plan.layers.get("self_prefix", []))
    expected = {"num_layers": layers, "num_attention_heads": plan.heads, "token_dim": plan.heads * plan.head_dim}
    for field, ours in expected.items():
        if raw.get(field) is not None and raw[field] != ours:
            raise CheckpointError(f"load_adapter: {config_path} has {field}={raw[field]}, this "
                                  f"{type(model).__name__} needs {ours}; the prefix was made for another base model.")
    tensors = {k.removeprefix(SAVED_PREFIX): v for k, v in read_safetensors(weights_path).items()}
    required = saved_requirements(model, plan.saved)
    shape = (length, layers * 2 * plan.heads * plan.head_dim)
    required[KEY] = ("prefix", None, shape, "(P, layers·2·H_kv·D) of this model", None)
    check_tensors(tensors, required, weights_path, "", model, "the prefix was made for another base model")

    def fill(undo):
        for key, (kind, where, _, _, _) in required.items():
            if kind == "prefix":
                flat = model.get_submodule(plan.targets[0][0]).prefix_tunings[name]["self_prefix"].control_trans
                flat.copy_(tensors[KEY].reshape(-1).to(flat.dtype))
            else:
                fill_saved(model, name, where, tensors[key])

    add_and_fill(model, name, config, fill)
    return model
