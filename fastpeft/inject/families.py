"""Per-family knowledge as data: where each model family keeps its projections, blocks and embeddings.

Adding a family is adding a row. Names are module-name suffixes as they appear in `model.named_modules()`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Site:
    """Where one bottleneck adapter location (after attention, after the feed-forward block) sits in a block.

    Paths are relative to the sub-layer, which is the first of `sublayer` (relative to the block; "" is the block
    itself) that exists. `output`: the module whose output is the sub-layer's result h, just before the model adds
    the residual. `residual`: the module whose positional argument `residual_arg` is the residual x. `norm`: in
    post-LN blocks, the LayerNorm the model applies to h + x (None in pre-LN blocks). `container`: the attribute
    holding the adapters by name, "layer.dict" for a dict inside a layer (AdapterHub's names, so state-dict keys
    match its checkpoints).
    """

    sublayer: tuple[str, ...]
    output: str
    residual: str
    residual_arg: int
    norm: str | None
    container: str


@dataclass(frozen=True)
class Placement:
    """Bottleneck adapter sites of a model family; `embeddings`: the module (relative to the base model) after
    whose output invertible adapters run."""

    mh_adapter: Site
    output_adapter: Site
    embeddings: str | None


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
    bottleneck: Placement | None = None  # where bottleneck adapters go (None: not supported yet)
    attention_calls: tuple[str, ...] = ()  # modules (relative to a block) that call transformers' attention
    cross_attention_calls: tuple[str, ...] = ()  # those of them that attend to the encoder's output
    positions: str = "absolute"  # how the family encodes positions (POSITIONS)


# What prefix tuning's shifted positions (PEFT's layout: the prefix at positions 0..P-1) mean per family:
#   "absolute": position ids, shifted by P for the real tokens;
#   "padding":  position ids counted over real tokens from pad_token_id + 1 (RoBERTa), shifted by P likewise;
#   "relative": no position ids; the first self-attention of each stack that has `has_relative_attention_bias` (T5)
#               computes a bias, which the prefix keys get for positions 0..P-1.
POSITIONS = ("absolute", "padding", "relative")


# Pre-LN blocks: x + sublayer(norm(x)); the adapter transforms the sub-layer's output, the model adds x.
_PRE_LN = Placement(
    mh_adapter=Site(("",), output="self_attn", residual="input_layernorm", residual_arg=0, norm=None,
                    container="attention_adapters.adapters"),
    output_adapter=Site(("",), output="mlp", residual="post_attention_layernorm", residual_arg=0, norm=None,
                        container="output_adapters.adapters"),
    embeddings="embed_tokens")
# Post-LN blocks (BERT): the output sub-module computes LayerNorm(dropout(dense(h)) + x) with x its 2nd argument.
_POST_LN = Placement(
    mh_adapter=Site(("attention.output",), output="dropout", residual="", residual_arg=1, norm="LayerNorm",
                    container="adapters"),
    output_adapter=Site(("output",), output="dropout", residual="", residual_arg=1, norm="LayerNorm",
                        container="adapters"),
    embeddings="embeddings")

_LLAMA = Family(q=("q_proj",), k=("k_proj",), v=("v_proj",), o=("o_proj",), ffn_in=("gate_proj", "up_proj"),
                ffn_out=("down_proj",), layers="layers", attention=("self_attn",), mlp=("mlp",),
                embeddings=("embed_tokens",), bottleneck=_PRE_LN, attention_calls=("self_attn",))
_BERT = Family(q=("query",), k=("key",), v=("value",), o=("attention.output.dense",),
               ffn_in=("intermediate.dense",), ffn_out=("output.dense",), layers="layer",
               attention=("attention",), mlp=("intermediate", "output"), embeddings=("word_embeddings",),
               bottleneck=_POST_LN, attention_calls=("attention.self",))

FAMILIES: dict[str, Family] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": replace(_LLAMA, attention_calls=()),  # logit soft-capping: not in the prefix-attention kernel
    "phi3": Family(q=("qkv_proj",), k=("qkv_proj",), v=("qkv_proj",), o=("o_proj",), ffn_in=("gate_up_proj",),
                   ffn_out=("down_proj",), layers="layers", attention=("self_attn",), mlp=("mlp",),
                   embeddings=("embed_tokens",)),
    "gpt2": Family(q=("c_attn",), k=("c_attn",), v=("c_attn",), o=("attn.c_proj",), ffn_in=("c_fc",),
                   ffn_out=("mlp.c_proj",), layers="h", attention=("attn",), mlp=("mlp",), embeddings=("wte",),
                   bottleneck=Placement(  # pre-LN; `drop` follows the token + position embeddings
                       mh_adapter=Site(("",), output="attn", residual="ln_1", residual_arg=0, norm=None,
                                       container="attention_adapters.adapters"),
                       output_adapter=Site(("",), output="mlp", residual="ln_2", residual_arg=0, norm=None,
                                           container="output_adapters.adapters"),
                       embeddings="drop"),
                   attention_calls=("attn",)),
    "bert": _BERT,
    "roberta": replace(_BERT, positions="padding"),
    "xlm-roberta": replace(_BERT, positions="padding"),
    "t5": Family(q=("q",), k=("k",), v=("v",), o=("o",), ffn_in=("wi", "wi_0", "wi_1"), ffn_out=("wo",),
                 layers="block", attention=("SelfAttention", "EncDecAttention"), mlp=("DenseReluDense",),
                 embeddings=("shared",),
                 bottleneck=Placement(  # pre-LN sub-layers x + dropout(f(layer_norm(x))); the decoder's FF is layer.2
                     mh_adapter=Site(("layer.0",), output="dropout", residual="layer_norm", residual_arg=0,
                                     norm=None, container="attention_adapters.adapters"),
                     output_adapter=Site(("layer.2", "layer.1"), output="dropout", residual="layer_norm",
                                         residual_arg=0, norm=None, container="output_adapters.adapters"),
                     embeddings=None),
                 attention_calls=("layer.0.SelfAttention", "layer.1.EncDecAttention"),
                 cross_attention_calls=("layer.1.EncDecAttention",), positions="relative"),
    "opt": Family(q=("q_proj",), k=("k_proj",), v=("v_proj",), o=("out_proj",), ffn_in=("fc1",), ffn_out=("fc2",),
                  layers="layers", attention=("self_attn",), mlp=(), embeddings=("embed_tokens",)),
}


# What to do on a model whose family lacks the row a method needs (the end of those TargetErrors).
NO_ROW_FIX = ("Use a model of one of them, or on this one a method that names its target layers "
              "(fp.LoRAConfig or fp.IA3Config with target_modules=[...]).")


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


# ------------------------------------------------------------------------------------------ mixture-of-experts weights
@dataclass(frozen=True)
class ExpertParam:
    """One fused expert tensor an adapter can target (LoRAConfig.target_parameters).

    role: "gate_up" (gate and up projections, 2·I outputs, then the module's gating), "up" (no gate), or "down".
    transposed: stored (E, in, out), y = x W_e (+ b_e); else (E, out, in), y = x W_eᵀ. bias: the (E, out) bias
    parameter's name, or None.
    """

    role: str
    transposed: bool
    bias: str | None = None


@dataclass(frozen=True)
class ExpertsLayout:
    """An experts class of transformers (decorated with `use_experts_implementation`): its targetable tensors in the
    module's own parameter order, and its gating — "chunk" (act(gate) * up with gate, up = chunk(2), transformers'
    default) or "module" (the class's own `_apply_gate`, e.g. GPT-OSS's interleaved, clamped SwiGLU)."""

    params: dict[str, ExpertParam]
    gate: str = "chunk"


_FUSED = ExpertsLayout({"gate_up_proj": ExpertParam("gate_up", False), "down_proj": ExpertParam("down", False)})

# experts class name -> layout. Adding an MoE family = adding a row (after checking its forward matches the layout).
EXPERTS: dict[str, ExpertsLayout] = {
    "MixtralExperts": _FUSED,
    "Qwen3MoeExperts": _FUSED,
    "Qwen2MoeExperts": _FUSED,
    "OlmoeExperts": _FUSED,
    "GptOssExperts": ExpertsLayout({"gate_up_proj": ExpertParam("gate_up", True, "gate_up_proj_bias"),
                                    "down_proj": ExpertParam("down", True, "down_proj_bias")}, gate="module"),
}


def experts_layout(module) -> ExpertsLayout | None:
    """The layout of an experts module (by its class name), or None when fastpeft has no row for it."""
    return EXPERTS.get(type(module).__name__)
