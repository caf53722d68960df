"""`fp.prepare_for_kbit_training(model)`: a quantized transformers model made ready to train adapters on, as PEFT's
`prepare_model_for_kbit_training` makes it (the QLoRA recipe users copy from PEFT's docs works with fp.add_adapter
in place of get_peft_model).

    1. every parameter frozen (it is called before fp.add_adapter, as PEFT's is before get_peft_model);
    2. half-precision dense parameters (norms, embeddings, the head, unquantized linears) cast to float32, unless
       the model's quantization keeps its own dtypes (GPTQ, AQLM, EETQ, HQQ, torchao: PEFT leaves those alone, and
       torchao's tensors hold their dtype); quantized storage is never touched;
    3. on a quantized model, with gradient checkpointing asked for (the default): the input embeddings' output
       made to require grad (reentrant checkpointing needs an input that does, or the adapters get no gradient),
       then the model's gradient checkpointing switched on.

A transformers model quantized at load time also gets, while it holds fastpeft adapters, the flag by which
transformers knows adapters are attached (`_hf_peft_config_loaded`, which its own adapter integration sets): the
Trainer refuses to train a quantized model without it, and with it gradient checkpointing keeps the inputs'
gradients on. It is removed with the model's last adapter (installed through state.register_installer).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import AdapterError
from ..modules.base_layers import is_dense_weight, quantized_kind
from .state import get_state, register_installer

KEEPS_ITS_DTYPES = ("gptq", "aqlm", "eetq", "hqq", "torchao")  # quantization methods whose dtypes stay as loaded


def prepare_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                              gradient_checkpointing_kwargs: dict | None = None) -> nn.Module:
    """Freeze the base, cast its half-precision dense parameters to float32 and, on a quantized model, enable
    gradient checkpointing with inputs that require grad (see the module docstring). Returns `model`."""
    kwargs = dict(gradient_checkpointing_kwargs or {})
    state = get_state(model)
    if state is not None and state.configs:
        raise AdapterError(f"prepare_for_kbit_training: this {type(model).__name__} already has adapters "
                           f"{sorted(state.configs)}, whose parameters it would freeze; call it on the base model, "
                           "before fp.add_adapter (as PEFT's prepare_model_for_kbit_training before get_peft_model).")
    method = getattr(model, "quantization_method", None)
    method = getattr(method, "value", method)  # transformers' QuantizationMethod enum or a string
    kinds = {quantized_kind(m) for m in model.modules()} - {None}
    quantized = bool(kinds) or method is not None or any(
        getattr(model, flag, False) for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"))
    checkpointing = quantized and use_gradient_checkpointing
    if checkpointing and not callable(getattr(model, "gradient_checkpointing_enable", None)):
        raise AdapterError(f"prepare_for_kbit_training: {type(model).__name__} has no gradient_checkpointing_enable "
                           "(a transformers PreTrainedModel has); pass use_gradient_checkpointing=False, or enable "
                           "checkpointing in your model yourself. Nothing was changed.")
    for p in model.parameters():
        p.requires_grad_(False)
    if not (method in KEEPS_ITS_DTYPES or "torchao" in kinds):
        for p in model.parameters():
            if p.dtype in (torch.float16, torch.bfloat16) and is_dense_weight(p):
                p.data = p.data.to(torch.float32)
    if checkpointing:
        if kwargs.get("use_reentrant", True):
            model.enable_input_require_grads()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def _flag_adapters(model: nn.Module) -> bool:
    """On a quantized transformers model: set the flag the Trainer looks for; True when this set it."""
    if getattr(model, "is_quantized", False) and getattr(model, "_hf_peft_config_loaded", None) is False:
        model._hf_peft_config_loaded = True
        return True
    return False


def _unflag_adapters(model: nn.Module, flagged: bool) -> None:
    if flagged:
        model._hf_peft_config_loaded = False


register_installer(_flag_adapters, _unflag_adapters)
