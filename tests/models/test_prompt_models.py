"""Prompt tuning and P-tuning end to end on tiny random models: the virtual tokens are where the config says (checked
against inputs built by hand), masks/labels/positions follow, training moves only the prompt, generation with the KV
cache gives the tokens generation without it gives, gradient checkpointing gives the same gradients, the lifecycle
calls (disable, deactivate, delete, unload) work, and bad input is refused with the model left as it was."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import fastpeft as fp
from fastpeft.modules import PromptEncoder, PromptTuning, PromptTuningLayer

pytest.importorskip("transformers")
from tests.harness import rel_err  # noqa: E402
from tests.models.tiny import IDS, assert_same_state, batch, model, out, snapshot, structure, train  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
FAMILIES = ["llama", "mistral", "qwen2", "gpt2", "bert", "t5"]
CONFIGS = {"prompt": lambda: fp.PromptTuningConfig(prompt_length=3, init_weights_seed=0),
           "after_bos": lambda: fp.PromptTuningConfig(prompt_length=3, combine="prefix_after_bos", init_weights_seed=1),
           "mlp": lambda: fp.PTuningConfig(prompt_length=3, encoder_hidden_size=16, init_weights_seed=2),
           "lstm": lambda: fp.PTuningConfig(prompt_length=3, encoder_type="LSTM", encoder_hidden_size=8,
                                            init_weights_seed=3)}


def hooks(m) -> int:
    return sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.modules())


@contextlib.contextmanager
def unchanged(m):
    """The body must raise; afterwards the model is as it was (weights, modules, flags, adapters, hooks)."""
    state, shape, adapters, count = snapshot(m), structure(m), fp.adapters(m), hooks(m)
    yield
    assert_same_state(m, state)
    assert structure(m) == shape and fp.adapters(m) == adapters and hooks(m) == count


def no_dropout(m) -> None:
    """Dropout off in train mode: nn.Dropout modules and the float rates attention modules read (T5's `dropout`)."""
    for mod in m.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
        for attr in ("dropout", "attention_dropout"):
            if isinstance(getattr(mod, attr, None), float):
                setattr(mod, attr, 0.0)


def prompt_of(m, name="a") -> torch.Tensor:
    layer = next(x for x in m.modules() if isinstance(x, PromptTuningLayer))
    return layer.prompt_tunings[name]().detach()


def logits(m, **kw):
    with torch.no_grad():
        return m(**kw).logits


# ------------------------------------------------------------------------------------------------ placement
@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_virtual_tokens_are_where_the_config_says(kind, cfg):
    m = model(kind)
    base = model(kind)
    fp.add_adapter(m, "a", CONFIGS[cfg]())
    virtual = prompt_of(m)[None].expand(2, -1, -1)
    emb = base.get_input_embeddings()(IDS)
    embeds = torch.cat([emb[:, :1], virtual, emb[:, 1:]], 1) if cfg == "after_bos" else torch.cat([virtual, emb], 1)
    if kind == "t5":  # encoder input only; the decoder and its outputs are unchanged
        expected = logits(base, inputs_embeds=embeds, decoder_input_ids=IDS[:, :4])
    else:
        expected = logits(base, inputs_embeds=embeds)
    got = out(m)
    assert got.shape == expected.shape
    assert rel_err(got, expected) < 1e-6  # (the LSTM's output differs in the last bit from call to call)
    if kind not in ("bert", "t5"):
        assert got.shape[1] == IDS.shape[1] + 3  # outputs keep the virtual positions, as PEFT's


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("cfg", ["prompt", "after_bos"])
def test_mask_labels_positions_and_token_types_follow(kind, cfg):
    m, base = model(kind), model(kind)
    fp.add_adapter(m, "a", CONFIGS[cfg]())
    mask = torch.ones_like(IDS)
    mask[1, 5:] = 0
    virtual = prompt_of(m)[None].expand(2, -1, -1)

    def put(x, v):
        return torch.cat([x[:, :1], v, x[:, 1:]], 1) if cfg == "after_bos" else torch.cat([v, x], 1)
    emb = base.get_input_embeddings()(IDS)
    ones = torch.ones(2, 3, dtype=mask.dtype)
    kw = dict(attention_mask=mask, labels=batch(m)["labels"])
    ref = dict(inputs_embeds=put(emb, virtual), attention_mask=put(mask, ones))
    if kind == "bert":
        kw["token_type_ids"] = torch.ones_like(IDS)
        ref["token_type_ids"] = put(kw["token_type_ids"], torch.zeros(2, 3, dtype=torch.long))
        ref["labels"] = kw["labels"]  # sequence labels are left alone
    else:
        ref["labels"] = put(kw["labels"], torch.full((2, 3), -100))
        pos = torch.arange(8)[None].expand(2, -1)
        kw["position_ids"] = pos
        ref["position_ids"] = torch.arange(11)[None].expand(2, -1)
    with torch.no_grad():
        got, expected = m(input_ids=IDS, **kw), base(**ref)
    assert torch.equal(got.logits, expected.logits)
    assert torch.equal(got.loss, expected.loss)
    if kind != "bert":  # explicit positions 0..n-1 give what the model's own positions give
        assert torch.equal(logits(m, input_ids=IDS, position_ids=kw["position_ids"]), out(m))


def test_positional_input_ids_and_inputs_embeds():
    m = model()
    fp.add_adapter(m, "a", CONFIGS["prompt"]())
    expected = out(m)
    assert torch.equal(logits(m, inputs_embeds=m.get_input_embeddings()(IDS)), expected)
    with torch.no_grad():
        assert torch.equal(m(IDS).logits, expected)


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert", "t5"])
@pytest.mark.parametrize("cfg", ["prompt", "mlp", "lstm"])
def test_training_moves_only_the_prompt_and_unload_restores(kind, cfg):
    m = model(kind)
    frozen, shape, count = snapshot(m), structure(m), hooks(m)
    fp.add_adapter(m, "a", CONFIGS[cfg]())
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(".prompt_tuning.prompt_tunings.a." in "." + n for n in trainable)
    if cfg == "prompt":
        assert trainable == {n for n in trainable if n.endswith("prompt_tunings.a.prompt_embedding.weight")}
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    losses = train(m, steps=10, lr=0.2)  # (eval mode: no dropout, a deterministic loss curve)
    assert losses[-1] < losses[0] - 0.015 and losses[-1] < min(losses[:3]), losses  # (frozen random LM: small)
    for n, p in m.named_parameters():
        assert torch.equal(p, before[n]) == (n not in trainable), n
    fp.unload(m)
    assert_same_state(m, frozen)
    assert structure(m) == shape and hooks(m) == count
    assert not hasattr(m, "_fastpeft_state")


def test_bert_head_trains_with_modules_to_save():
    m = model("bert")
    fp.add_adapter(m, "a", fp.PromptTuningConfig(prompt_length=4, modules_to_save=["classifier"]))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert "classifier.modules_to_save.a.weight" in trainable
    losses = train(m, steps=8, lr=0.05)
    assert losses[-1] < 0.9 * losses[0]
    fp.unload(m)
    assert torch.equal(out(m), out(model("bert")))


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert", "t5"])
@pytest.mark.parametrize("cfg", ["prompt", "lstm"])
def test_gradient_checkpointing_gives_the_same_gradients(kind, cfg):
    grads = []
    for checkpointing in (False, True):
        m = model(kind)
        fp.add_adapter(m, "a", CONFIGS[cfg]())
        if checkpointing:
            m.gradient_checkpointing_enable()
        m.train()
        no_dropout(m)
        m(**batch(m)).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and all(g is not None for g in grads[1].values())
    for n, g in grads[0].items():
        assert rel_err(grads[1][n], g) < 1e-5, n


# ------------------------------------------------------------------------------------------------ generation
@pytest.mark.parametrize("kind, cfg", [("llama", "prompt"), ("mistral", "after_bos"), ("gpt2", "mlp"),
                                       ("qwen2", "lstm")])
def test_generation_with_cache_matches_without(kind, cfg):
    m = model(kind)
    fp.add_adapter(m, "a", CONFIGS[cfg]())
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.mul_(3)  # a prompt strong enough to change what the model generates
    mask = torch.ones_like(IDS)
    mask[1, :3] = 0  # left padding
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0, output_scores=True,
              return_dict_in_generate=True)
    cached, plain = m.generate(IDS, **kw), m.generate(IDS, use_cache=False, **kw)
    assert cached.sequences.shape == (2, 13)
    assert torch.equal(cached.sequences, plain.sequences)
    for a, b in zip(cached.scores, plain.scores):
        assert rel_err(a, b) < 1e-5
    with fp.disable_adapters(m), torch.no_grad():  # the prompt is what changes the first step
        assert rel_err(m(input_ids=IDS, attention_mask=mask).logits[:, -1], cached.scores[0]) > 1e-3


def test_t5_generation_with_cache_matches_without():
    m = model("t5")
    fp.add_adapter(m, "a", CONFIGS["lstm"]())
    mask = torch.ones_like(IDS)
    mask[1, 6:] = 0
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True,
              suppress_tokens=[0, 1])
    cached, plain = m.generate(IDS, **kw), m.generate(IDS, use_cache=False, **kw)
    assert torch.equal(cached.sequences, plain.sequences)
    for a, b in zip(cached.scores, plain.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # (suppressed tokens: -inf in both)
    with fp.disable_adapters(m):
        base = m.generate(IDS, **kw).scores[0]
    assert (base - cached.scores[0]).nan_to_num(0.0, 0.0, 0.0).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------ lifecycle
def test_disable_deactivate_delete_and_two_prompts():
    m = model()
    base = out(m)
    fp.add_adapter(m, "a", CONFIGS["prompt"]())
    fp.add_adapter(m, "b", CONFIGS["mlp"]())
    assert out(m).shape[1] == 11
    with fp.disable_adapters(m):
        assert torch.equal(out(m), base)
    fp.set_active_adapters(m, None)
    assert torch.equal(out(m), base) and not any(p.requires_grad for p in m.parameters())
    fp.set_active_adapters(m, ["a", "b"])  # both prompts, one after the other
    emb = m.get_input_embeddings()(IDS)
    virtual = torch.cat([prompt_of(m, "a"), prompt_of(m, "b")])[None].expand(2, -1, -1)
    assert torch.equal(out(m), logits(model(), inputs_embeds=torch.cat([virtual, emb], 1)))
    fp.set_active_adapters(m, "b")
    only_b = out(m)
    fp.delete_adapter(m, "a")
    assert torch.equal(out(m), only_b)
    assert [n for n, _ in m.named_modules() if n.endswith("prompt_tunings.b")]
    fp.delete_adapter(m, "b")
    assert torch.equal(out(m), base) and hooks(m) == 0
    assert not any(isinstance(x, PromptTuningLayer) for x in m.modules())


def test_prompt_with_lora():
    m = model()
    fp.add_adapter(m, "p", CONFIGS["mlp"]())
    fp.add_adapter(m, "l", fp.LoRAConfig(target_modules="all-linear"))
    # the prompt encoder's own Linear layers are not LoRA targets
    assert [n for n, _ in fp.inject.swap.wrappers(m) if "prompt_tuning" in n] == ["model.prompt_tuning"]
    fp.set_active_adapters(m, ["p", "l"])
    assert out(m).shape[1] == 11
    fp.unload(m)
    assert torch.equal(out(m), out(model()))


# ------------------------------------------------------------------------------------------------ init
class _Tokenizer:
    def __call__(self, text):
        return {"input_ids": [5 + len(w) for w in text.split()]}


def test_from_string_copies_the_token_embeddings():
    m = model()
    fp.add_adapter(m, "a", fp.PromptTuningConfig(prompt_length=5, prompt_init="from_string",
                                                 prompt_init_text="ab cde f", tokenizer=_Tokenizer()))
    rows = m.get_input_embeddings().weight[[7, 8, 6, 7, 8]]
    assert torch.equal(prompt_of(m), rows)
    m2 = model()
    fp.add_adapter(m2, "a", fp.PromptTuningConfig(prompt_length=2, prompt_init="text",
                                                  prompt_tuning_init_text="ab cde f", tokenizer=_Tokenizer()))
    assert torch.equal(prompt_of(m2), rows[:2])


def test_random_uniform_init_and_seed():
    m1, m2 = model(), model()
    for m in (m1, m2):
        fp.add_adapter(m, "a", fp.PromptTuningConfig(prompt_length=50, random_uniform_scale=0.25, init_weights_seed=3))
    assert torch.equal(prompt_of(m1), prompt_of(m2))
    p = prompt_of(m1)
    assert p.abs().max() <= 0.25 and p.abs().max() > 0.2 and abs(p.mean()) < 0.05
    assert isinstance(PromptEncoder(3, 8), nn.Module) and isinstance(PromptTuning(3, 8), nn.Module)


# ------------------------------------------------------------------------------------------------ errors
def test_missing_init_text_is_a_config_error():
    with pytest.raises(fp.ConfigError, match="prompt_init_text"):
        fp.PromptTuningConfig(prompt_init="from_string")


@pytest.mark.parametrize("kw, match", [
    (dict(), "no tokenizer was given"),
    (dict(tokenizer_name_or_path="/nonexistent/tokenizer-folder"), "gave no tokenizer"),
    (dict(tokenizer=lambda text: {"input_ids": [500]}), "outside the model's vocabulary"),
    (dict(tokenizer=lambda text: {"input_ids": []}), "gives no tokens"),
])
def test_from_string_without_a_usable_tokenizer(kw, match):
    m = model()
    fp.add_adapter(m, "other", fp.LoRAConfig())
    with unchanged(m), pytest.raises(fp.ConfigError, match=match) as info:
        fp.add_adapter(m, "a", fp.PromptTuningConfig(prompt_init="from_string", prompt_init_text="hello", **kw))
    assert str(info.value).startswith("PromptTuningConfig.")


def test_model_without_input_embeddings():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
    m = Plain()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(fp.TargetError, match="no input token embeddings"):
        fp.add_adapter(m, "a", fp.PromptTuningConfig())
    assert list(m.state_dict()) == list(before) and hooks(m) == 0 and not fp.adapters(m)


@pytest.mark.parametrize("kw, match", [
    (dict(attention_mask=torch.ones(2, 7, dtype=torch.long)), "attention_mask has shape"),
    (dict(labels=IDS[:, :5]), "labels have shape"),
    (dict(position_ids=torch.arange(5)[None]), "position_ids"),
])
def test_inputs_that_do_not_match(kw, match):
    m = model()
    fp.add_adapter(m, "a", CONFIGS["prompt"]())
    with unchanged(m), pytest.raises(fp.AdapterError, match=match):
        m(input_ids=IDS, **kw)
    assert out(m).shape[1] == 11  # the model still works


def test_error_in_apply_leaves_nothing_behind(monkeypatch):
    from fastpeft.inject import prompt as prompt_inject
    m = model()

    def broken(*args, **kwargs):
        raise RuntimeError("boom")
    monkeypatch.setattr(prompt_inject, "wrap_saved", broken)
    with unchanged(m), pytest.raises(RuntimeError, match="boom"):
        fp.add_adapter(m, "a", CONFIGS["prompt"]())
    assert hooks(m) == 0
