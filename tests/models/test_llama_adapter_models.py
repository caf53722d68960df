"""LLaMA-Adapter end to end on tiny random models: identity at init (gate 0), the lifecycle (disable, switch, delete,
unload back to the original bits), training, generation with a KV cache, gradient checkpointing, torch.compile,
checkpoints (fastpeft's round trip and PEFT's adaption-prompt format both ways), coexistence with prefix tuning,
and bad input that leaves the model as it was."""
from __future__ import annotations

import json

import pytest
import torch

import fastpeft as fp
from fastpeft.modules.attention import site_of

pytest.importorskip("transformers")
from tests.harness import rel_err  # noqa: E402
from tests.models.tiny import (  # noqa: E402
    IDS, assert_compiled_matches_eager, assert_same_state, batch, model, out, snapshot, structure, train)

pytestmark = pytest.mark.filterwarnings("ignore")
FAMILIES = ["llama", "mistral", "qwen2"]
PEFT_FAMILIES = ["llama", "mistral"]  # PEFT 0.21's adaption prompt has no Qwen2 row


def sites(m) -> int:
    return sum(site_of(x) is not None for x in m.modules())


def hooks(m) -> int:
    return sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.modules())


def params(m, name: str, suffix: str) -> list[torch.Tensor]:
    return [p for n, p in m.named_parameters() if f".adaption_prompts.{name}." in n and n.endswith(suffix)]


def open_gates(m, name: str = "a", seed: int = 0) -> None:
    """Non-zero gates, so the adapter changes the outputs (a trained adapter's state)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params(m, name, "adaption_gate"):
            p.copy_(torch.randn(p.shape, generator=g))


def with_adapter(kind: str, name: str = "a", opened: bool = True, **options):
    m = model(kind)
    torch.manual_seed(0)
    fp.add_adapter(m, name, fp.LlamaAdapterConfig(**{"adapter_len": 4, **options}))
    if opened:
        open_gates(m, name)
    return m


@pytest.mark.parametrize("kind", FAMILIES)
def test_identity_at_init_then_lifecycle_restores_the_base(kind):
    m = model(kind)
    before, state, base, count = out(m), snapshot(m), m.config._attn_implementation, hooks(m)
    fp.add_adapter(m, "a", fp.LlamaAdapterConfig(adapter_len=4))
    assert m.config._attn_implementation == "fastpeft_" + base and sites(m) == 2
    assert torch.equal(out(m), before)  # gate 0: bit-identical
    prompts = params(m, "a", "adaption_prompt")
    assert [tuple(p.shape) for p in prompts] == [(1, 4, 32)] * 2 and all(p.std() > 0.5 for p in prompts)
    open_gates(m)
    changed = out(m)
    assert rel_err(changed, before) > 1e-3
    with fp.disable_adapters(m):
        assert torch.equal(out(m), before)
    fp.set_active_adapters(m, None)
    assert torch.equal(out(m), before)
    fp.set_active_adapters(m, "a")
    assert torch.equal(out(m), changed)
    fp.unload(m)
    assert m.config._attn_implementation == base and sites(m) == 0 and hooks(m) == count
    assert not hasattr(m.model, "llama_adapter") and not fp.adapters(m)
    assert torch.equal(out(m), before)
    assert_same_state(m, state)


def test_adapter_layers_picks_the_top_layers():
    m = with_adapter("llama", adapter_layers=1)
    stem = "model.llama_adapter.adaption_prompts.a.1."
    assert [n for n, _ in m.named_parameters() if "adaption" in n] == [stem + "adaption_prompt", stem + "adaption_gate"]


@pytest.mark.parametrize("kind", FAMILIES)
def test_training_reduces_the_loss_and_trains_only_prompts_and_gates(kind):
    m = model(kind)
    torch.manual_seed(0)
    fp.add_adapter(m, "a", fp.LlamaAdapterConfig(adapter_len=4))
    trained = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trained and all(n.rsplit(".", 1)[-1] in ("adaption_prompt", "adaption_gate") for n in trained)
    start = snapshot(m)
    losses = train(m, steps=8, lr=1e-2)
    assert losses[-1] < losses[0]
    now = m.state_dict()
    moved = {k for k in start if not torch.equal(start[k], now[k])}
    assert moved == {k for k in start if "adaption" in k}  # gates and prompts learn, nothing else changes


@pytest.mark.parametrize("kind", FAMILIES)
def test_generation_with_cache_matches_recomputation(kind):
    m = with_adapter(kind)
    ids = IDS[:1]
    cached = m.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
    plain = m.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.tolist() == plain.tolist()
    with torch.no_grad():
        cache = m(input_ids=IDS, use_cache=True).past_key_values
    assert cache.get_seq_length() == IDS.shape[1]  # the prompt never enters the KV cache


def test_gradient_checkpointing_gives_the_same_gradients():
    m = with_adapter("llama")
    m.train()

    def grads():
        m.zero_grad(set_to_none=True)
        m(**batch(m)).loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}

    plain = grads()
    m.gradient_checkpointing_enable()
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and len(plain) == 4
    for name, g in plain.items():
        assert g.abs().sum() > 0 and rel_err(checkpointed[name], g) < 1e-5, name


def test_torch_compile_fullgraph_matches_eager():
    assert_compiled_matches_eager(with_adapter("llama"))


def test_several_adapters_add_their_terms_and_delete_keeps_the_rest():
    m = with_adapter("llama")
    fp.add_adapter(m, "b", fp.LlamaAdapterConfig(adapter_len=2, adapter_layers=1))
    open_gates(m, "b", seed=1)
    base = model("llama")
    a_only = out(m)
    fp.set_active_adapters(m, "b")
    b_only = out(m)
    fp.set_active_adapters(m, ["a", "b"])
    both = out(m)
    assert min(rel_err(both, a_only), rel_err(both, b_only), rel_err(a_only, b_only)) > 1e-4
    fp.delete_adapter(m, "b")
    assert torch.equal(out(m), a_only) and not params(m, "b", "gate")
    fp.delete_adapter(m, "a")
    assert m.config._attn_implementation == "sdpa" and sites(m) == 0 and not hasattr(m.model, "llama_adapter")
    assert torch.equal(out(m), out(base))


@pytest.mark.parametrize("first", ["prefix", "llama_adapter"])
def test_coexists_with_prefix_tuning(first):
    m = model("llama")
    before = out(m)
    torch.manual_seed(0)
    fp.add_adapter(m, "p", fp.PrefixTuningConfig(prefix_length=3, bottleneck_size=16))
    fp.add_adapter(m, "a", fp.LlamaAdapterConfig(adapter_len=4))
    open_gates(m)
    site = site_of(m.model.layers[0].self_attn)
    assert site.prefix is not None and site.adaption is not None
    prefix_only = out(m)
    fp.set_active_adapters(m, "a")
    adapter_only = out(m)
    fp.set_active_adapters(m, ["p", "a"])
    both = out(m)
    assert min(rel_err(both, prefix_only), rel_err(both, adapter_only), rel_err(prefix_only, before)) > 1e-4
    gone, kept, expected = ("p", "a", adapter_only) if first == "prefix" else ("a", "p", prefix_only)
    fp.delete_adapter(m, gone)
    assert m.config._attn_implementation == "fastpeft_sdpa" and sites(m) == 2
    assert getattr(site_of(m.model.layers[0].self_attn), "adaption" if kept == "a" else "prefix") is not None
    assert rel_err(out(m), expected) < 1e-6
    fp.unload(m)
    assert m.config._attn_implementation == "sdpa" and sites(m) == 0 and torch.equal(out(m), before)


@pytest.mark.parametrize("kind,options", [("llama", {}), ("qwen2", {"adapter_layers": 1})])
def test_save_load_round_trip(tmp_path, kind, options):
    m = with_adapter(kind, **options)
    train(m, steps=2)
    expected = out(m)
    fp.save_adapter(m, tmp_path, "a")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADAPTION_PROMPT" and config["target_modules"] == "self_attn"
    assert config["adapter_layers"] == options.get("adapter_layers", 2) and config["adapter_len"] == 4
    fresh = model(kind)
    fp.load_adapter(fresh, tmp_path, "a")
    assert torch.equal(out(fresh), expected)
    assert fp.trainable_parameters(fresh) == fp.trainable_parameters(m)


@pytest.mark.parametrize("kind", PEFT_FAMILIES)
def test_peft_adaption_prompt_checkpoints_both_ways(tmp_path, kind):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    theirs = peft.get_peft_model(model(kind), peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=3,
                                                                        adapter_layers=1))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if n.endswith("adaption_gate"):
                p.fill_(0.8)
    theirs.eval()
    theirs.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = theirs(input_ids=IDS).logits
    m = model(kind)
    fp.load_adapter(m, tmp_path / "peft", "a")
    assert fp.adapters(m)["a"].adapter_len == 3 and fp.adapters(m)["a"].adapter_layers == 1
    got = out(m)
    assert rel_err(got, expected) < 1e-5 and rel_err(got, out(model(kind))) > 1e-3
    ours = m.generate(IDS[:1], max_new_tokens=5, do_sample=False)
    assert ours.tolist() == theirs.generate(input_ids=IDS[:1], max_new_tokens=5, do_sample=False).tolist()
    with_adapter(kind)  # another model's adapter: its own RNG draws do not matter
    fp.save_adapter(m, tmp_path / "back", "a")
    again = peft.PeftModel.from_pretrained(model(kind), tmp_path / "back").eval()
    with torch.no_grad():
        assert rel_err(again(input_ids=IDS).logits, got) < 1e-5
    trained = with_adapter(kind)  # all layers, fastpeft-made
    fp.save_adapter(trained, tmp_path / "ours", "a")
    again = peft.PeftModel.from_pretrained(model(kind), tmp_path / "ours").eval()
    with torch.no_grad():
        assert rel_err(again(input_ids=IDS).logits, out(trained)) < 1e-5


@pytest.mark.parametrize("kind,error,match", [
    ("opt", fp.TargetError, "no row for model_type='opt'"),
    ("gpt2", fp.TargetError, "fused projection"),
    ("t5", fp.TargetError, "encoder-decoder"),
    ("llama", fp.ConfigError, "adapter_layers"),
])
def test_bad_input_leaves_the_model_unchanged(kind, error, match):
    m = model(kind)
    before, shape, count, impl = snapshot(m), structure(m), hooks(m), m.config._attn_implementation
    with pytest.raises(error, match=match):
        fp.add_adapter(m, "a", fp.LlamaAdapterConfig(adapter_layers=3))
    assert structure(m) == shape and hooks(m) == count and sites(m) == 0
    assert m.config._attn_implementation == impl and not fp.adapters(m)
    assert_same_state(m, before)


def test_bad_checkpoints_leave_the_model_unchanged(tmp_path):
    source = with_adapter("llama")
    fp.save_adapter(source, tmp_path / "good", "a")
    for target in ("gpt2", "opt"):
        other = model(target)
        before = snapshot(other)
        with pytest.raises(fp.CheckpointError):
            fp.load_adapter(other, tmp_path / "good", "a")
        assert not fp.adapters(other) and sites(other) == 0
        assert_same_state(other, before)
    m = with_adapter("llama", name="keep")
    before, shape, count, expected = snapshot(m), structure(m), hooks(m), out(m)
    config_path = tmp_path / "good" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    for field, value, match in [("adapter_len", 5, "shape"), ("adapter_layers", 1, "top 1 layers"),
                                ("adapter_layers", 3, "adapter_layers"), ("target_modules", "attn", "target_modules")]:
        config_path.write_text(json.dumps({**config, field: value}))
        with pytest.raises(fp.CheckpointError, match=match):
            fp.load_adapter(m, tmp_path / "good", "a")
        assert structure(m) == shape and hooks(m) == count and list(fp.adapters(m)) == ["keep"]
        assert_same_state(m, before)
        assert torch.equal(out(m), expected)
