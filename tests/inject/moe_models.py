"""Tiny random mixture-of-experts models (Mixtral, Qwen3-MoE, GPT-OSS) and PEFT helpers for the expert LoRA tests."""
from __future__ import annotations

import torch

EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
FAMILIES = ("mixtral", "qwen3_moe", "gpt_oss")


def tiny_moe(family: str, *, layers: int = 1, seed: int = 0):
    """A tiny random model of `family` in eval mode, float32, built from a config (no download)."""
    import transformers as tf

    common = dict(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2)
    if family == "mixtral":
        config = tf.MixtralConfig(**common, intermediate_size=48, num_local_experts=4)
        cls = tf.MixtralForCausalLM
    elif family == "qwen3_moe":
        config = tf.Qwen3MoeConfig(**common, moe_intermediate_size=24, num_experts=4, head_dim=8)
        cls = tf.Qwen3MoeForCausalLM
    else:
        config = tf.GptOssConfig(**common, intermediate_size=48, num_local_experts=4, head_dim=8)
        cls = tf.GptOssForCausalLM
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # GPT-OSS initialises its expert biases and router to zeros: make them matter
        for name, p in model.named_parameters():
            if "experts" in name or "router" in name:
                p.normal_(0, 0.2)
    return model


def same_model(model):
    """A fresh copy of `model`'s base (same class, config and weights)."""
    clone = type(model)(model.config).eval()
    clone.load_state_dict(model.state_dict())
    return clone


def peft_model(model, **kwargs):
    """PEFT's LoRA with random A and B (init_lora_weights=False) on the expert tensors of `model`."""
    from peft import LoraConfig, get_peft_model

    kwargs.setdefault("target_modules", [])
    kwargs.setdefault("target_parameters", EXPERT_PARAMS)
    torch.manual_seed(1)
    return get_peft_model(model, LoraConfig(init_lora_weights=False, **kwargs))


def ids(seed: int = 0, rows: int = 2, length: int = 7):
    return torch.randint(0, 100, (rows, length), generator=torch.Generator().manual_seed(seed))


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
