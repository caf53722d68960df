"""The base layers adapters wrap, and the dtype and device new adapter parameters take on them.

A layer kind fastpeft adapts has a rule here for recognising it; a kind without one is refused at add_adapter
(inject/targets.py), never computed wrongly.
"""
from __future__ import annotations

import torch
from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_dense_weight(weight) -> bool:
    """A dense floating-point tensor (torch.Tensor or nn.Parameter itself). Tensor subclasses are not: quantized
    weights such as torchao's NF4Tensor or int8 tensors report a floating dtype, but their storage is not W's values,
    so computing with their data (or their .t()) would be wrong."""
    return type(weight) in (torch.Tensor, nn.Parameter) and weight.dtype.is_floating_point


def is_plain_linear(module: nn.Module) -> bool:
    """An nn.Linear (or subclass that keeps nn.Linear's forward) or a Conv1D, with a dense floating-point weight."""
    if is_conv1d(module):
        return is_dense_weight(module.weight)
    return (isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
            and is_dense_weight(module.weight))


def quantized_kind(module: nn.Module) -> str | None:
    """The quantized linear layers LoRA adapts through the layer's own forward (y = base(x) + the low-rank term, the
    base product computed by the quantization library): "bnb_4bit" (bitsandbytes' Linear4bit and its NF4/FP4
    subclasses), "bnb_8bit" (Linear8bitLt), "torchao" (an nn.Linear holding a torchao quantized tensor, NF4 or
    int8/int4 weight-only, whose F.linear the library implements); None for any other layer."""
    for cls in type(module).__mro__:
        if cls.__module__.split(".")[0] == "bitsandbytes" and cls.__name__ in ("Linear4bit", "Linear8bitLt"):
            return "bnb_4bit" if cls.__name__ == "Linear4bit" else "bnb_8bit"
    weight = getattr(module, "weight", None)
    if (isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward and isinstance(weight, torch.Tensor)
            and type(weight).__module__.split(".")[0] == "torchao" and weight.dtype.is_floating_point):
        return "torchao"
    return None


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """W (out, in) of a quantized layer (quantized_kind), dequantized by its library's own function:
    bitsandbytes' dequantize_4bit / int8_vectorwise_dequant, torchao's get_original_weight() (NF4) or
    dequantize() (its other tensors)."""
    kind, weight = quantized_kind(module), module.weight
    if kind == "torchao":
        original = getattr(weight, "get_original_weight", None)
        return original() if callable(original) else weight.dequantize()
    import bitsandbytes as bnb

    if kind == "bnb_4bit":
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    if kind == "bnb_8bit":
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
        return bnb.functional.int8_vectorwise_dequant(weight.data, scales.to(weight.device))
    raise TypeError(f"dequantized_weight: {describe_linear(module)} is not a quantized layer fastpeft knows")


def packed_4bit(data: torch.Tensor, state):
    """A bitsandbytes 4-bit weight (a Linear4bit's weight.data and weight.quant_state) as fastpeft's 4-bit ops take
    it (fastpeft/ops/lora_4bit.Packed4bit): the packed codes and statistics read in place, and the library's own
    dequantization."""
    import bitsandbytes as bnb

    from ..ops.lora_4bit import Packed4bit

    nested = {}
    if state.nested:
        nested = dict(absmax_code=state.state2.code, absmax_scale=state.state2.absmax,
                      absmax_offset=float(state.offset), blocksize2=int(state.state2.blocksize))
    return Packed4bit(packed=data.view(torch.uint8), absmax=state.absmax, code=state.code,
                      shape=tuple(int(d) for d in state.shape), blocksize=int(state.blocksize), dtype=state.dtype,
                      dequantize=lambda: bnb.functional.dequantize_4bit(data, state), **nested)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear layer: its weight's shape ((in, out) for a Conv1D), or, for a
    quantized kind (a packed weight), its in_features / out_features."""
    if quantized_kind(module):
        return module.in_features, module.out_features
    w = module.weight
    return (w.shape[0], w.shape[1]) if is_conv1d(module) else (w.shape[1], w.shape[0])


def describe_linear(module: nn.Module) -> str:
    """The layer's class and its weight's kind, for error messages: 'Linear4bit, weight Params4bit uint8'."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return type(module).__name__
    return f"{type(module).__name__}, weight {type(weight).__name__} {str(weight.dtype).replace('torch.', '')}"


def looks_linear(module: nn.Module) -> bool:
    """A linear layer of some kind, with or without a rule here: nn.Linear and its subclasses, Conv1D, and the
    quantized or custom linears that keep nn.Linear's in_features/out_features (bitsandbytes' Linear4bit and
    Linear8bitLt, ...) or are called ...Linear... and hold a weight (torchao's quantized nn.Linear included: a
    tensor subclass as weight). add_adapter refuses the ones for which is_plain_linear is False, saying that
    fastpeft has no rule for their kind yet."""
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return True
    has_weight = isinstance(getattr(module, "weight", None), torch.Tensor)
    sized = hasattr(module, "in_features") and hasattr(module, "out_features")
    return has_weight and (sized or "linear" in type(module).__name__.lower())


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapter parameters live in float32 on half-precision bases (as PEFT's default), else in the base dtype."""
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype


def adapter_placement(model: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    """(device, dtype) of a model-wide adapter's new parameters: those of the model's first floating-point
    parameter (adapter_dtype of it); (None, None) for a model without one."""
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    return (None, None) if weight is None else (weight.device, adapter_dtype(weight))
