"""Per-family knowledge as data: where each model family keeps its projections, blocks and embeddings.

Adding a family is adding a row. Names are module-name suffixes as they appear in `model.named_modules()`.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    q: tuple[str, ...]            # query projection (GPT-2: the fused qkv projection)
    k: tuple[str, ...]
    v: tuple[str, ...]
    o: tuple[str, ...]            # attention output projection
    ffn_in: tuple[str, ...]       # feed-forward layers before the activation
    ffn_out: tuple[str, ...]      # feed-forward layer after the activation
    layers: str                   # the ModuleList of transformer blocks (its path segment)
    attention: tuple[str, ...]    # attention module(s) inside a block
    mlp: tuple[str, ...]          # feed-forward module inside a block
    embeddings: tuple[str, ...]   # input token embeddings


_LLAMA = Family(q=("q_proj",), k=("k_proj",), v=("v_proj",), o=("o_proj",), ffn_in=("gate_proj", "up_proj"),
                ffn_out=("down_proj",), layers="layers", attention=("self_attn",), mlp=("mlp",),
                embeddings=("embed_tokens",))
_BERT = Family(q=("query",), k=("key",), v=("value",), o=("attention.output.dense",),
               ffn_in=("intermediate.dense",), ffn_out=("output.dense",), layers="layer",
               attention=("attention",), mlp=("intermediate", "output"), embeddings=("word_embeddings",))

FAMILIES: dict[str, Family] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "phi3": Family(q=("qkv_proj",), k=("qkv_proj",), v=("qkv_proj",), o=("o_proj",), ffn_in=("gate_up_proj",),
                   ffn_out=("down_proj",), layers="layers", attention=("self_attn",), mlp=("mlp",),
                   embeddings=("embed_tokens",)),
    "gpt2": Family(q=("c_attn",), k=("c_attn",), v=("c_attn",), o=("attn.c_proj",), ffn_in=("c_fc",),
                   ffn_out=("mlp.c_proj",), layers="h", attention=("attn",), mlp=("mlp",), embeddings=("wte",)),
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "t5": Family(q=("q",), k=("k",), v=("v",), o=("o",), ffn_in=("wi", "wi_0", "wi_1"), ffn_out=("wo",),
                 layers="block", attention=("SelfAttention", "EncDecAttention"), mlp=("DenseReluDense",),
                 embeddings=("shared",)),
    "opt": Family(q=("q_proj",), k=("k_proj",), v=("v_proj",), o=("out_proj",), ffn_in=("fc1",), ffn_out=("fc2",),
                  layers="layers", attention=("self_attn",), mlp=(), embeddings=("embed_tokens",)),
}


def family_of(model) -> tuple[str | None, Family | None]:
    """(model_type, Family) of a transformers model, or (model_type, None) when no row exists."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type, FAMILIES.get(model_type)


def default_lora_targets(family: Family) -> list[str]:
    """LoRA's default targets, as in the LoRA paper and PEFT: the query and value projections."""
    return sorted(set(family.q + family.v))


def default_ia3_targets(family: Family) -> tuple[list[str], list[str]]:
    """IA3's defaults, as in the (IA)³ paper and PEFT: keys, values and the feed-forward output layer (the
    last scales its input)."""
    return sorted(set(family.k + family.v + family.ffn_out)), sorted(set(family.ffn_out))
