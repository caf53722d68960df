"""Tiny random Hugging Face models built from configs (no downloads), and helpers to compare their states.

Each builder gives a two-layer model with hidden size 32 and a 100-token vocabulary, in float32 eval mode,
the same weights every time (built once per session, then deep-copied).
"""
from __future__ import annotations

import copy

import torch
import transformers
from torch import nn

from fastpeft.inject.swap import wrappers
from fastpeft.modules import LoRALinear

VOCAB = 100
_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
_ENCODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=70, num_labels=3)


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**_DECODER))


def _mistral():
    return transformers.MistralForCausalLM(transformers.MistralConfig(**_DECODER, sliding_window=None))


def _qwen2():
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_DECODER))


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0))


def _bert():
    return transformers.BertForSequenceClassification(transformers.BertConfig(**_ENCODER))


def _roberta():
    return transformers.RobertaForSequenceClassification(transformers.RobertaConfig(**_ENCODER, pad_token_id=1))


def _t5():
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0))


def _opt():
    return transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=32, max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=0))


BUILDERS = {"llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "gpt2": _gpt2, "bert": _bert,
            "roberta": _roberta, "t5": _t5, "opt": _opt}
_BASES: dict[str, nn.Module] = {}


def model(kind: str = "llama") -> nn.Module:
    """A fresh copy of a tiny random model of this family, in eval mode."""
    if kind not in _BASES:
        torch.manual_seed(1)
        _BASES[kind] = BUILDERS[kind]().eval()
    return copy.deepcopy(_BASES[kind])


IDS = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))


def batch(m: nn.Module, ids: torch.Tensor = IDS) -> dict[str, torch.Tensor]:
    """Model inputs for `ids`, with labels so that the output carries a loss."""
    if isinstance(m, transformers.T5ForConditionalGeneration):
        return {"input_ids": ids, "labels": ids[:, :4].contiguous()}
    if m.config.model_type in ("bert", "roberta"):
        return {"input_ids": ids, "labels": ids[:, 0] % m.config.num_labels}
    return {"input_ids": ids, "labels": ids}


def out(m: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    """The model's logits on `ids`, without gradients."""
    with torch.no_grad():
        if isinstance(m, transformers.T5ForConditionalGeneration):
            return m(input_ids=ids, decoder_input_ids=ids[:, :4]).logits
        return m(input_ids=ids).logits


def lora_paths(m: nn.Module) -> set[str]:
    return {n for n, mod in wrappers(m) if isinstance(mod, LoRALinear)}


def trainable(m: nn.Module) -> set[str]:
    return {n for n, p in m.named_parameters() if p.requires_grad}


def snapshot(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def assert_same_state(m: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """Same keys in the same order, same dtypes, same bits."""
    now = m.state_dict()
    assert list(now) == list(before)
    for k, v in before.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), k


def structure(m: nn.Module) -> list[tuple[str, type, tuple[bool, ...]]]:
    """Every module's path, type and parameters' requires_grad flags: what a failed call must not change."""
    return [(n, type(mod), tuple(p.requires_grad for p in mod.parameters(recurse=False)))
            for n, mod in m.named_modules()]


def train(m: nn.Module, steps: int = 10, lr: float = 1e-2) -> list[float]:
    """AdamW on m's trainable parameters over one fixed batch; the loss of each step."""
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr)
    inputs = batch(m)
    losses = []
    for _ in range(steps):
        loss = m(**inputs).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def logits_and_grads(run, m: nn.Module, ids: torch.Tensor = IDS):
    """Logits of run(ids) and the gradients of mean(logits²) on m's trainable parameters (run: m or compiled m)."""
    m.zero_grad(set_to_none=True)
    logits = run(input_ids=ids).logits
    logits.float().pow(2).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}


def assert_compiled_matches_eager(m: nn.Module, backend: str = "aot_eager") -> dict:
    """torch.compile(m, fullgraph=True) (no graph break allowed) gives eager's logits and gradients."""
    from tests.harness import rel_err

    torch._dynamo.reset()
    eager_logits, eager_grads = logits_and_grads(m, m)
    logits, grads = logits_and_grads(torch.compile(m, fullgraph=True, backend=backend), m)
    assert rel_err(logits, eager_logits) < 1e-5
    assert grads.keys() == eager_grads.keys() and grads
    for name, g in grads.items():
        assert rel_err(g, eager_grads[name]) < 1e-4, name
    return grads
