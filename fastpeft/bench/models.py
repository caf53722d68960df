"""The layers and models the benchmarks build around fastpeft's ops: PEFT's frozen base layer, how a PEFT layer
class takes its hyperparameters, a random Llama (no download)."""
from __future__ import annotations

import inspect

import torch


def frozen_linear(w: torch.Tensor) -> torch.nn.Linear:
    """nn.Linear(K, N, bias=False) of w's dtype and device, its frozen weight sharing w's storage (PEFT's base)."""
    N, K = w.shape
    base = torch.nn.utils.skip_init(torch.nn.Linear, K, N, bias=False, device=w.device, dtype=w.dtype)
    base.weight = torch.nn.Parameter(w.detach(), requires_grad=False)
    return base


def takes_config(peft_class: type) -> bool:
    """Whether a PEFT layer class takes its hyperparameters as a config (`config=`, recent PEFT) rather than as
    keyword arguments (older releases)."""
    try:
        return "config" in inspect.signature(peft_class.__init__).parameters
    except (TypeError, ValueError):
        return False


def random_llama(dims: dict, max_positions: int, dtype, device, seed: int):
    """A random LlamaForCausalLM of the given dims (hidden, intermediate, layers, heads, kv_heads, vocab; no
    download), frozen, SDPA attention, in eval mode."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=dims["vocab"], hidden_size=dims["hidden"], intermediate_size=dims["intermediate"],
        num_hidden_layers=dims["layers"], num_attention_heads=dims["heads"], num_key_value_heads=dims["kv_heads"],
        max_position_embeddings=max_positions, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config)
    model.set_attn_implementation("sdpa")
    return model.to(dtype).requires_grad_(False).eval()
