"""Prefix tuning in PEFT's on-disk format (peft_type "PREFIX_TUNING"), both ways.

PEFT keeps the prefix in the KV cache, so real tokens sit at positions P..P+L-1; its checkpoint holds one tensor,
`prompt_embeddings` (P, layers·2·H_kv·D): every layer's keys and values in the layout of fastpeft's flat prefix
((P, layers, 2, H_kv, D)). Loading gives a flat adapter with shift_positions=True (PEFT's positions, so outputs
match PEFT's; on T5 the prefix keys get the relative position bias of positions 0..P-1); saving writes the flat
prefix an adapter produces (reparameterised or not). Encoder-decoder models: PEFT prefixes only the decoder's
self-attention (num_transformer_submodules 2, its cross-attention cache is emptied), and its decoder layer l reads
the rows of layer 2l mod n (it doubles the tensor and takes four rows per layer): loading maps them so, saving
writes PEFT's format only for an adapter that repeats itself that way (one loaded from PEFT does). PEFT cannot express gating,
leave_out, unshifted positions, encoder or cross-attention prefixes: such adapters are saved in fastpeft's layout
(checkpoint/adapterhub.py) instead — `peft_compatible` decides.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import PrefixTuningConfig
from ..errors import CheckpointError
from ..inject import prefix as prefix_inject
from ..modules.prefix import PrefixTuningPool
from .files import (add_and_fill, check_fields, check_tensors, fill_saved, peft_modules_to_save, plan_for_checkpoint,
                    present_modules_to_save, read_safetensors, saved_copy_tensors, saved_requirements)

KEY = "prompt_embeddings"
KEY_PREFIX = ""  # PEFT writes prompt-learning tensors without "base_model.model."
SAVED_PREFIX = "base_model."  # ... and its modules_to_save copies (a task head) as base_model.<path>.<key>
_KNOWN = {"num_virtual_tokens", "num_layers", "num_attention_heads", "token_dim", "num_transformer_submodules",
          "encoder_hidden_size", "prefix_projection", "modules_to_save"}
_IGNORED = {"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
            "inference_mode", "init_weights"}
TASKS = (("ForConditionalGeneration", "SEQ_2_SEQ_LM"), ("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
         ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"))


def peft_compatible(model: nn.Module, name: str, config: PrefixTuningConfig) -> bool:
    """Whether PEFT's format holds this adapter exactly (encoder-decoder models: PEFT prefixes only the decoder's
    self-attention, and its layer l reads the prefix rows of layer 2l mod n, so the adapter must repeat itself)."""
    if not (config.shift_positions and not config.use_gating and not config.leave_out):
        return False
    if not _seq2seq(model):
        return True
    if config.encoder_prefix or config.cross_prefix:
        return False
    prefix = _self_prefix(model, name)
    layers = prefix.flat_prefix().view(config.prefix_length, prefix.n_layers, -1)
    return _to_peft_layers(layers) is not None


def _self_prefix(model: nn.Module, name: str):
    pool = next(m for m in model.modules() if isinstance(m, PrefixTuningPool))
    return pool.prefix_tunings[name]["self_prefix"]


def _peft_rows(n: int) -> list[int]:
    """PEFT's encoder-decoder prefix: it doubles its (P, 2n rows) tensor and gives layer l rows 4l, 4l+1 of the
    doubled one, i.e. layer (2l mod n)'s keys and values."""
    return [(2 * layer) % n for layer in range(n)]


def _to_peft_layers(ours: torch.Tensor) -> torch.Tensor | None:
    """(P, n, 2·H_kv·D) per decoder layer -> PEFT's rows, or None when PEFT cannot hold them (layers that PEFT reads
    from one row differ). Rows no layer reads stay zero."""
    peft = torch.zeros_like(ours)
    for layer, row in enumerate(_peft_rows(ours.shape[1])):
        first = _peft_rows(ours.shape[1]).index(row)
        if first != layer and not torch.equal(ours[:, layer], ours[:, first]):
            return None
        peft[:, row] = ours[:, layer]
    return peft


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
        "token_dim": kv * head_dim, "num_transformer_submodules": 2 if _seq2seq(model) else 1,
        "encoder_hidden_size": config.bottleneck_size,
        "prefix_projection": False, "modules_to_save": peft_modules_to_save(model, saved),
    }
    layers = prefix.flat_prefix().view(config.prefix_length, prefix.n_layers, -1)
    if _seq2seq(model):
        layers = _to_peft_layers(layers)
    tensors = {KEY: layers.reshape(config.prefix_length, -1)}
    tensors.update({SAVED_PREFIX + k: v for k, v in saved_copy_tensors(model, name, saved).items()})
    return tensors, fields


def load(model: nn.Module, name: str, raw: dict, config_path: str, weights_path: str) -> nn.Module:
    check_fields(raw, _KNOWN, _IGNORED, config_path, "PREFIX_TUNING")
    submodules = raw.get("num_transformer_submodules") or 1
    if submodules != (2 if _seq2seq(model) else 1):
        raise CheckpointError(f"load_adapter: {config_path} has num_transformer_submodules={submodules}, which does "
                              f"not fit this {'encoder-decoder' if _seq2seq(model) else 'single-stack'} "
                              f"{type(model).__name__}; the prefix was made for another kind of model.")
    length = raw.get("num_virtual_tokens")
    saved = present_modules_to_save(model, raw.get("modules_to_save"))
    try:
        config = PrefixTuningConfig(prefix_length=length, flat=True, shift_positions=True,
                                    encoder_prefix=False, cross_prefix=False,  # PEFT: the decoder's self-attention
                                    bottleneck_size=raw.get("encoder_hidden_size") or 512,
                                    modules_to_save=list(dict.fromkeys(saved)) if saved else None)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"load_adapter: {config_path} holds a prefix-tuning config fastpeft cannot use: "
                              f"{exc}") from None
    plan = plan_for_checkpoint(prefix_inject.plan, model, name, config, config_path, raw)
    layers = layers_count = len(plan.layers.get("self_prefix", []))
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
                layers = tensors[KEY].view(length, layers_count, -1)
                if _seq2seq(model):
                    layers = layers[:, _peft_rows(layers_count)]
                flat.copy_(layers.reshape(-1).to(flat.dtype))
            else:
                fill_saved(model, name, where, tensors[key])

    add_and_fill(model, name, config, fill)
    return model


def _seq2seq(model: nn.Module) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))
