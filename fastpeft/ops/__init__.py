"""Functional ops, one registered torch op per hot path; each dispatches to Triton or the reference.

    fp.ops.lora_linear(x, weight, bias, lora_a, lora_b, scale, dropout_p=0.0, seed=None, fan_in_fan_out=False)
    fp.ops.lora_linear_4bit(x, packed_4bit_weight, bias, lora_a, lora_b, scale, dropout_p=0.0, seed=None)
    fp.ops.ia3_linear(x, weight, bias, in_scale=None, out_scale=None, fan_in_fan_out=False)
    fp.ops.dora_linear(x, weight, bias, lora_a, lora_b, scale, magnitude, dropout_p=0.0, seed=None, ...)
    fp.ops.phm_linear(x, rule, w, bias=None, w_right=None)
    fp.ops.bottleneck_adapter(x, residual, w_down, b_down, w_up, b_up, non_linearity="relu", scaling=1.0, ...)
    fp.ops.prefix_attention(q, k, v, prefix_k=None, prefix_v=None, scale=None, causal=False, key_padding_mask=None,
                            query_offset=None, attn_mask=None, prefix_offsets=None, prefix_lengths=None)
    fp.ops.multi_lora_linear(x, weight, bias, lora_a=[...], lora_b=[...], scale=[...], adapter_index=idx)
    fp.ops.multi_ia3_linear(x, weight, bias, vectors=[...], adapter_index=idx, feedforward=False)
    fp.ops.activation("gelu_new")   # the bottleneck non-linearity by AdapterHub's name

Dispatch state (context variables, per thread): fp.ops.use_backend, fp.ops.poison_outputs, fp.ops.use_kernel_options.
"""
from .attention import prefix_attention
from .bottleneck import activation, bottleneck_adapter
from .dispatch import (KernelOptions, explain, kernel_options, poison_outputs, requested_backend, use_backend,
                       use_kernel_options)
from .dora import dora_linear, dora_weight_norm, dora_weight_sq_norm
from .ia3 import ia3_linear
from . import lora_4bit  # noqa: F401  (fp.ops.lora_4bit.path: the 4-bit layers ask it)
from .lora import lora_linear
from .lora_4bit import Packed4bit, lora_linear_4bit
from .multi_ia3 import IA3Bank, multi_ia3_linear, multi_ia3_scale
from .multi_lora import LoRABank, multi_lora_linear
from .phm import phm_linear
from .routing import Routing

__all__ = ["lora_linear", "lora_linear_4bit", "Packed4bit", "ia3_linear", "dora_linear", "phm_linear", "bottleneck_adapter", "prefix_attention",
           "multi_lora_linear", "LoRABank", "multi_ia3_linear", "multi_ia3_scale", "IA3Bank", "Routing",
           "dora_weight_norm", "dora_weight_sq_norm", "use_backend", "requested_backend", "poison_outputs", "explain",
           "KernelOptions", "kernel_options", "use_kernel_options", "activation"]
