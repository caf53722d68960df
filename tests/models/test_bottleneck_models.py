"""Bottleneck, Compacter and invertible adapters end to end on tiny random models of every family with a placement
row: identity at zero init, training reduces the loss, save/load round trip, stacking, unload, and bad input that
leaves the model as it was (hooks included)."""
from __future__ import annotations

import os

import pytest
import torch

import fastpeft as fp
from fastpeft.modules import AdapterContainer, BottleneckLayer

pytest.importorskip("transformers")
from tests.harness import rel_err  # noqa: E402
from tests.models.tiny import (  # noqa: E402
    IDS, assert_compiled_matches_eager, assert_same_state, batch, model, out, snapshot, structure, train)

pytestmark = pytest.mark.filterwarnings("ignore")
FAMILIES = ["llama", "mistral", "qwen2", "gpt2", "bert", "roberta", "t5"]


def hooks(m) -> int:
    return sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.modules())


def containers(m) -> dict[str, AdapterContainer]:
    return {n: x for n, x in m.named_modules() if isinstance(x, AdapterContainer)}


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("config", [fp.ParBnConfig(), fp.SeqBnConfig(init_weights="mam"),
                                    fp.DoubleSeqBnConfig(init_weights="mam", reduction_factor=4)],
                         ids=["par", "seq_mam", "double_mam"])
def test_identity_at_zero_init(kind, config):
    m = model(kind)
    before = out(m)
    fp.add_adapter(m, "a", config)
    sites = [x for x in m.modules() if isinstance(x, BottleneckLayer)]
    assert len(sites) == (4 if config.mh_adapter else 2) * (2 if kind == "t5" else 1)
    assert torch.equal(out(m), before)


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("config", [fp.DoubleSeqBnConfig(reduction_factor=2),
                                    fp.CompacterConfig(reduction_factor=4, phm_dim=4)], ids=["houlsby", "compacter"])
def test_training_reduces_the_loss_and_unload_restores(kind, config):
    m = model(kind)
    frozen, shape = snapshot(m), structure(m)
    fp.add_adapter(m, "a", config)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all("adapters.a." in n or "shared_parameters.a." in n for n in trainable)
    if kind in ("bert", "roberta"):  # a new task head trains with the adapter (AdapterHub's heads do the same)
        m.classifier.requires_grad_(True)
    adapter_before = {n: p.detach().clone() for n, p in m.named_parameters() if n in trainable}
    losses = train(m, steps=12)
    assert losses[-1] < 0.97 * losses[0], losses  # the frozen random LM head limits what adapters alone can do
    assert all(not torch.equal(p, adapter_before[n]) for n, p in m.named_parameters() if n in trainable)
    fp.unload(m)
    if kind in ("bert", "roberta"):  # the head trained on purpose; the rest must be bit for bit as before
        m.classifier.load_state_dict({k.split(".", 1)[1]: v for k, v in frozen.items() if k.startswith("classifier.")})
    assert_same_state(m, frozen)
    assert structure(m) == shape and hooks(m) == 0


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert", "roberta", "t5"])
@pytest.mark.parametrize("config", [fp.SeqBnConfig(), fp.CompacterPlusPlusConfig(reduction_factor=8),
                                    fp.BnConfig(mh_adapter=True, scaling="channel", use_gating=True, ln_after=True,
                                                reduction_factor={"0": 4, "default": 8}, non_linearity="tanh")],
                         ids=["seq", "compacter_pp", "custom"])
def test_save_load_round_trip(kind, config, tmp_path):
    m = model(kind)
    fp.add_adapter(m, "a", config)
    with torch.no_grad():  # every parameter away from its init, so no zero hides a wrong key
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    expected = out(m)
    fp.save_adapter(m, tmp_path, "a")
    assert sorted(os.listdir(tmp_path)) == ["adapter.safetensors", "adapter_config.json"]
    fresh = model(kind)
    fp.load_adapter(fresh, tmp_path, name="b")
    assert rel_err(out(fresh), expected) < 1e-6
    assert fp.adapters(fresh)["b"].to_dict() == config.to_dict()


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_stack_runs_in_order_and_swaps_in_one_call(kind):
    m = model(kind)
    for name in ("en", "de", "task"):
        fp.add_adapter(m, name, fp.SeqBnConfig(reduction_factor=4))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".adapters." in n:
                p.normal_(0, 0.3)
    results = {}
    for setup in (fp.Stack("en", "task"), fp.Stack("task", "en"), fp.Stack("de", "task")):
        fp.set_active_adapters(m, setup)
        results[setup] = out(m)
    assert rel_err(results[fp.Stack("en", "task")], results[fp.Stack("task", "en")]) > 1e-4
    assert rel_err(results[fp.Stack("en", "task")], results[fp.Stack("de", "task")]) > 1e-4
    trainable = {n.split(".adapters.")[-1].split(".")[0] for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"de", "task"}
    # by hand: en then task in each layer is the same as a model whose single adapter does both steps
    fp.set_active_adapters(m, ["en", "task"])
    assert torch.equal(out(m), results[fp.Stack("en", "task")])
    with fp.disable_adapters(m):
        assert torch.equal(out(m), out(model(kind)))


def test_stack_matches_adapterhub_composition_by_hand():
    """Stack("a", "b") on a pre-LN block: u_i = hidden_i + x, hidden_{i+1} = up_i(u_i) + hidden_i, out = x + last."""
    m = model("llama")
    for name in ("a", "b"):
        fp.add_adapter(m, name, fp.SeqBnConfig(reduction_factor=4))
    fp.set_active_adapters(m, fp.Stack("a", "b"))
    layer = m.model.layers[0].output_adapters
    h, x = torch.randn(2, 3, 32), torch.randn(2, 3, 32)

    def up(name, u):
        a = layer.adapters[name]
        return a.adapter_up(torch.relu(a.adapter_down[0](u)))
    hidden = h
    for name in ("a", "b"):
        hidden = up(name, hidden + x) + hidden
    with torch.no_grad():
        layer._residual.put(x)
        got = layer._transform_output(None, (), h)
    assert rel_err(got, hidden.detach()) < 1e-6


def test_leave_out_and_reduction_mapping():
    m = model("llama")
    fp.add_adapter(m, "a", fp.SeqBnConfig(leave_out=[0], reduction_factor={"1": 4, "default": 8}))
    assert list(containers(m)) == ["model.layers.1.output_adapters"]
    assert m.model.layers[1].output_adapters.adapters.a.adapter_up.weight.shape == (32, 8)


def test_lora_and_bottleneck_together():
    m = model("llama")
    fp.add_adapter(m, "bn", fp.SeqBnConfig(init_weights="mam"))
    fp.add_adapter(m, "lora", fp.LoRAConfig(target_modules="all-linear"))
    paths = [n for n, _ in fp.inject.swap.wrappers(m)]
    assert not any("adapters" in p.split(".")[-1] and "lora" in p for p in paths)
    assert not any(".adapters.bn." in p for p in paths)  # the adapter's own Linear layers are not LoRA targets
    fp.set_active_adapters(m, ["bn", "lora"])
    assert torch.equal(out(m), out(model("llama")))  # both start as the identity
    fp.delete_adapter(m, "bn")
    assert not containers(m)
    fp.unload(m)
    assert hooks(m) == 0


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        m = model("llama").train()
        torch.manual_seed(0)
        fp.add_adapter(m, "a", fp.DoubleSeqBnConfig(reduction_factor=4))
        if checkpointing:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m(**batch(m)).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert rel_err(grads[1][n], grads[0][n]) < 1e-6, n


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_compiles_without_graph_breaks_and_generates_with_a_cache(kind):
    m = model(kind)
    fp.add_adapter(m, "a", fp.CompacterConfig(reduction_factor=4, phm_dim=4))
    assert_compiled_matches_eager(m)
    mask = torch.ones_like(IDS)
    cached = m.generate(IDS, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    uncached = m.generate(IDS, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                          use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_invertible_adapter_runs_forward_then_inverse_before_the_head(kind):
    m = model(kind)
    fp.add_adapter(m, "a", fp.SeqBnInvConfig(init_weights="mam"))
    inv = next(x for x in m.modules() if type(x).__name__ == "InvertibleAdapters")
    block = inv._modules["a"]
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
        result = m(input_ids=IDS, output_hidden_states=True)
        hidden = result.hidden_states[-1]
        head = m.get_output_embeddings()
        expected = torch.nn.functional.linear(block(hidden, rev=True), head.weight, head.bias)
        assert rel_err(result.logits, expected) < 1e-6
        embeddings = m.get_input_embeddings()(IDS)
        assert rel_err(block(block(embeddings), rev=True), embeddings) < 1e-5
    assert rel_err(result.logits, out(model(kind))) > 1e-3


# ------------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("config, error, match", [
    (fp.SeqBnConfig(reduction_factor=3), fp.ConfigError, "does not divide the hidden size 32"),
    (fp.CompacterConfig(reduction_factor=4, phm_dim=3), fp.ConfigError, "phm_dim"),
    (fp.SeqBnConfig(leave_out=[0, 5]), fp.ConfigError, r"leave_out: layer\(s\) \[5\]"),
    (fp.SeqBnConfig(reduction_factor={"7": 4, "default": 16}), fp.ConfigError, "keys"),
    (fp.BnConfig(cross_adapter=True), fp.ConfigError, "cross_adapter"),
], ids=["reduction", "phm_dim", "leave_out", "mapping_key", "cross"])
def test_bad_config_leaves_the_model_unchanged(config, error, match):
    m = model("llama")
    fp.add_adapter(m, "ok", fp.SeqBnConfig())
    state, shape, n_hooks, before = snapshot(m), structure(m), hooks(m), out(m)
    with pytest.raises(error, match=match):
        fp.add_adapter(m, "bad", config)
    assert_same_state(m, state)
    assert structure(m) == shape and hooks(m) == n_hooks and list(fp.adapters(m)) == ["ok"]
    assert torch.equal(out(m), before)


def test_unknown_non_linearity_and_unsupported_families():
    with pytest.raises(fp.ConfigError, match="non_linearity"):
        fp.SeqBnConfig(non_linearity="softsign")
    m = model("opt")
    with pytest.raises(fp.TargetError, match="no placement row for model_type='opt'"):
        fp.add_adapter(m, "a", fp.SeqBnConfig())
    assert hooks(m) == 0 and not fp.adapters(m)
    with pytest.raises(fp.ConfigError, match="original_ln_after"):
        fp.add_adapter(model("bert"), "a", fp.SeqBnConfig(original_ln_after=False))


def test_bottleneck_adapters_do_not_merge():
    m = model("llama")
    fp.add_adapter(m, "a", fp.SeqBnConfig())
    with pytest.raises(fp.AdapterError, match="cannot be merged"):
        fp.merge_adapter(m, "a")


def test_failure_half_way_removes_the_containers(monkeypatch):
    from fastpeft.modules import bottleneck

    m = model("llama")
    shape, n_hooks = structure(m), hooks(m)
    calls = []

    def failing_init(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        original(self, *args, **kwargs)
    original = bottleneck.BottleneckAdapter.__init__
    monkeypatch.setattr(bottleneck.BottleneckAdapter, "__init__", failing_init)
    with pytest.raises(RuntimeError, match="boom"):
        fp.add_adapter(m, "a", fp.DoubleSeqBnConfig())
    assert structure(m) == shape and hooks(m) == n_hooks and not fp.adapters(m)
