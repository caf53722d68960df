"""Prompt tuning and P-tuning adapters in PEFT's on-disk format (peft_type "PROMPT_TUNING" and "P_TUNING").

The weights file holds `prompt_embeddings` (num_virtual_tokens x token_dim: the virtual token embeddings the model
sees; for P-tuning the prompt encoder's output, as PEFT saves it) and "base_model." + path + "." + key for each
state_dict entry of a `modules_to_save` copy (PEFT's prompt-learning layout, without ".model"). A loaded P-tuning
adapter therefore has no encoder (PTuningConfig(inference_mode=True), as PEFT's loaded adapters): its virtual token
embeddings train directly.

adapter_config.json gets `task_type` from the model class (CAUSAL_LM, SEQ_2_SEQ_LM, SEQ_CLS, ...) so
PeftModel.from_pretrained picks the model class that inserts the prompt, and num_transformer_submodules=1 (fastpeft
puts the prompt into the encoder's input only). PEFT's encoder-decoder default, num_transformer_submodules=2, keeps
2P rows of which its forward feeds the encoder the first P (the decoder gets none): loading takes those P rows. combine="prefix_after_bos" has no PEFT counterpart: it is written
as an extra `combine` field that fastpeft reads and PEFT ignores (with a warning at save time).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..config import PromptTuningConfig, PTuningConfig
from ..errors import CheckpointError
from ..inject import prompt as prompt_inject
from .files import (add_and_fill, check_fields, check_tensors, clean_module_names, fill_saved, peft_modules_to_save,
                    plan_for_checkpoint, present_modules_to_save, read_safetensors, saved_copy_tensors,
                    saved_requirements)

KEY_PREFIX = ""          # PEFT writes prompt-learning tensors without "base_model.model."
PREFIX = "base_model."  # PEFT's prefix for the modules_to_save copies of prompt-learning adapters
KEY = "prompt_embeddings"
_COMMON = {"num_virtual_tokens", "token_dim", "num_transformer_submodules", "modules_to_save", "combine"}
_P_TUNING = {"encoder_reparameterization_type", "encoder_hidden_size", "encoder_num_layers", "encoder_dropout"}
_IGNORED = {"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
            "inference_mode", "num_attention_heads", "num_layers", "prompt_tuning_init", "prompt_tuning_init_text",
            "tokenizer_name_or_path", "tokenizer_kwargs"}
_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}
_TASKS = (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
          ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"))


def task_type(model: nn.Module) -> str:
    """PEFT's task_type for this model class (the PeftModel subclass that inserts the prompt for it)."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return "SEQ_2_SEQ_LM"
    name = type(model).__name__
    return next((task for suffix, task in _TASKS if name.endswith(suffix)), "FEATURE_EXTRACTION")


def _auto_heads(model: nn.Module, task: str | None) -> list[str]:
    """Paths of the heads PEFT's model class for `task` adds to modules_to_save (classifier/score, qa_outputs)."""
    names = _HEADS.get(task, ())
    return [p for p in clean_module_names(model) if p and any(p == n or p.endswith("." + n) for n in names)]


def _sizes(model: nn.Module) -> tuple[int | None, int | None]:
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads = next((getattr(cfg, a) for a in ("num_attention_heads", "num_heads", "n_head") if hasattr(cfg, a)), None)
    layers = next((getattr(cfg, a) for a in ("num_hidden_layers", "num_layers", "n_layer") if hasattr(cfg, a)), None)
    return heads, layers


def export(model: nn.Module, name: str, config, targets: list[str], saved: list[str]
           ) -> tuple[dict[str, torch.Tensor], dict]:
    """PEFT's tensors (full keys: KEY_PREFIX is empty) and adapter_config.json fields for adapter `name`."""
    module = model.get_submodule(targets[0]).prompt_tunings[name]
    training = module.training
    module.eval()  # the encoder's dropout off, as the saved embeddings are what inference sees
    try:
        with torch.no_grad():
            embeddings = module().detach()
    finally:
        module.train(training)
    tensors = {KEY: embeddings}
    tensors.update({PREFIX + k: v for k, v in saved_copy_tensors(model, name, saved).items()})
    auto = [p for p in _auto_heads(model, task_type(model)) if p not in saved]
    for path in auto:  # PEFT's task model trains and loads these heads always: write them as they are now
        module = model.get_submodule(path)
        module = getattr(module, "original_module", module)
        tensors.update({f"{PREFIX}{path}.{k}": v for k, v in module.state_dict().items()})
    heads, layers = _sizes(model)
    fields = {
        "peft_type": "PROMPT_TUNING" if isinstance(config, PromptTuningConfig) else "P_TUNING",
        "task_type": task_type(model), "auto_mapping": None, "revision": None, "inference_mode": True,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "num_virtual_tokens": config.prompt_length, "token_dim": int(embeddings.shape[1]),
        "num_transformer_submodules": 1, "num_attention_heads": heads, "num_layers": layers,
        "modules_to_save": peft_modules_to_save(model, sorted(saved + auto)),
    }
    if isinstance(config, PromptTuningConfig):
        text = config.prompt_init == "from_string" and config.tokenizer_name_or_path
        fields.update({"prompt_tuning_init": "TEXT" if text else "RANDOM",
                       "prompt_tuning_init_text": config.prompt_init_text if text else None,
                       "tokenizer_name_or_path": config.tokenizer_name_or_path if text else None,
                       "tokenizer_kwargs": None})
        if config.combine != "prefix":
            warnings.warn(f"save_adapter: adapter {name!r} uses combine={config.combine!r}, which PEFT does not have; "
                          "the checkpoint records it for fastpeft, but PEFT would put the prompt before the first "
                          "token.",
                          stacklevel=4)
            fields["combine"] = config.combine
    else:
        fields.update({"encoder_reparameterization_type": config.encoder_type,
                       "encoder_hidden_size": config.encoder_hidden_size or int(embeddings.shape[1]),
                       "encoder_num_layers": config.encoder_num_layers, "encoder_dropout": config.encoder_dropout})
    return tensors, fields


def _config(raw: dict, model: nn.Module, config_path: str):
    p_tuning = raw.get("peft_type") == "P_TUNING"
    method = "P_TUNING" if p_tuning else "PROMPT_TUNING"
    check_fields(raw, _COMMON | (_P_TUNING if p_tuning else set()), _IGNORED, config_path, method)
    sub = raw.get("num_transformer_submodules")
    seq2seq = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    if sub not in ((None, 1, 2) if seq2seq else (None, 1)):
        raise CheckpointError(f"load_adapter: {config_path} sets num_transformer_submodules={sub!r}, which does not "
                              f"fit this {type(model).__name__}; the adapter was made for another kind of model.")
    saved = present_modules_to_save(model, raw.get("modules_to_save"))
    heads = _auto_heads(model, raw.get("task_type"))  # PEFT's task model saves these whatever the config lists
    saved = list(dict.fromkeys((saved or []) + heads)) or None
    kwargs = {"prompt_length": raw.get("num_virtual_tokens"), "modules_to_save": saved}
    try:
        if p_tuning:
            for theirs, ours in (("encoder_reparameterization_type", "encoder_type"),
                                 ("encoder_hidden_size", "encoder_hidden_size"),
                                 ("encoder_num_layers", "encoder_num_layers"), ("encoder_dropout", "encoder_dropout")):
                if raw.get(theirs) is not None:
                    kwargs[ours] = raw[theirs]
            return PTuningConfig(inference_mode=True, **kwargs)
        return PromptTuningConfig(combine=raw.get("combine") or "prefix", **kwargs)
    except (ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"load_adapter: {config_path} holds a {method} config fastpeft cannot use: {exc}") \
            from None


def load(model: nn.Module, name: str, raw: dict, config_path: str, weights_path: str) -> nn.Module:
    """Add prompt tuning / P-tuning adapter `name` from a checkpoint whose config `raw` was read already."""
    config = _config(raw, model, config_path)
    tensors = read_safetensors(weights_path)
    plan = plan_for_checkpoint(prompt_inject.plan, model, name, config, config_path, raw)
    if raw.get("token_dim") not in (None, plan.hidden):
        raise CheckpointError(f"load_adapter: {config_path} has token_dim={raw['token_dim']} but this "
                              f"{type(model).__name__} embeds tokens in {plan.hidden} dimensions; the adapter was made "
                              "for another base model (base_model_name_or_path="
                              f"{raw.get('base_model_name_or_path')!r}).")
    required = {PREFIX + k: v for k, v in saved_requirements(model, plan.saved).items()}
    rows = config.prompt_length * (raw.get("num_transformer_submodules") or 1)
    required[KEY] = ("prompt", None, (rows, plan.hidden),
                     "(num_virtual_tokens x num_transformer_submodules, hidden size) of the model", None)
    check_tensors(tensors, required, weights_path, "", model,
                  "the adapter was saved for a base model with another hidden size, or with other num_virtual_tokens "
                  "(or num_transformer_submodules)")

    def fill(undo):
        container = model.get_submodule(plan.targets[0][0])
        module = container.prompt_tunings[name]
        target = module.prompt_embedding if isinstance(config, PromptTuningConfig) else module.embedding
        for key, (kind, where, _, _, _) in required.items():
            if kind == "prompt":  # PEFT's seq2seq models keep 2P rows and feed the encoder the first P
                target.weight.copy_(tensors[key][:config.prompt_length])
            else:
                fill_saved(model, name, where, tensors[key])

    add_and_fill(model, name, config, fill)
    return model
