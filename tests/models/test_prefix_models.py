"""Prefix tuning end to end on tiny random models: the attention registration (delegation, masks in every form the
previous implementation takes), training, generation with a KV cache, gradient checkpointing, eject, checkpoints
(PEFT's both ways, fastpeft's layout), and bad input that leaves the model as it was."""
from __future__ import annotations

import pytest
import torch

import fastpeft as fp
from fastpeft.modules.attention import site_of

pytest.importorskip("transformers")
from tests.harness import rel_err  # noqa: E402
from tests.models.tiny import (  # noqa: E402
    IDS, assert_compiled_matches_eager, assert_same_state, batch, model, out, snapshot, structure, train)

pytestmark = pytest.mark.filterwarnings("ignore")
FAMILIES = ["llama", "mistral", "qwen2", "gpt2", "bert", "roberta", "t5"]
DECODERS = ["llama", "mistral", "qwen2", "gpt2"]
SMALL = dict(prefix_length=5, bottleneck_size=16)


def sites(m) -> int:
    return sum(site_of(x) is not None for x in m.modules())


def hooks(m) -> int:
    return sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.modules())


def with_prefix(kind: str, **options):
    m = model(kind)
    torch.manual_seed(0)
    fp.add_adapter(m, "p", fp.PrefixTuningConfig(**{**SMALL, **options}))
    return m


def logits(m, ids=IDS, **kwargs):
    with torch.no_grad():
        if m.config.model_type == "t5":
            return m(input_ids=ids, decoder_input_ids=ids[:, :4], **kwargs).logits
        return m(input_ids=ids, **kwargs).logits


@pytest.mark.parametrize("kind", FAMILIES)
def test_prefix_changes_output_disable_and_unload_restore(kind):
    m = model(kind)
    before, state, base = out(m), snapshot(m), m.config._attn_implementation
    fp.add_adapter(m, "p", fp.PrefixTuningConfig(**SMALL))
    assert m.config._attn_implementation == "fastpeft_" + base
    assert sites(m) == (6 if kind == "t5" else 2)
    assert rel_err(out(m), before) > 1e-3
    with fp.disable_adapters(m):
        assert torch.equal(out(m), before)
    fp.set_active_adapters(m, None)
    assert torch.equal(out(m), before)
    fp.unload(m)
    assert m.config._attn_implementation == base and sites(m) == 0
    assert torch.equal(out(m), before)
    assert_same_state(m, state)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert", "t5"])
def test_padded_rows_match_the_row_alone(kind):
    """Key padding (left for decoders, right for encoders) hides padded keys, never the prefix."""
    m = with_prefix(kind)
    ids = IDS.clone()
    mask = torch.ones_like(ids)
    pad = 3
    left = kind in DECODERS
    if left:
        mask[0, :pad] = 0
    else:
        mask[0, -pad:] = 0
    extra = {}
    if left:  # positions from the mask, as generate() computes them
        extra["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    full = logits(m, ids, attention_mask=mask, **extra)
    real = ids[:1, pad:] if left else ids[:1, :-pad]
    if kind == "t5":
        alone = logits(m, real)
        assert rel_err(full[0], alone[0]) < 1e-5
        return
    alone = logits(m, real)
    rows = full[0, pad:] if left else full[0] if kind in ("bert", "roberta") else full[0, :-pad]
    assert rel_err(rows, alone[0]) < 1e-5


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert", "t5"])
def test_eager_and_sdpa_masks_give_the_same_outputs(kind):
    m = model(kind)
    m.set_attn_implementation("eager")
    torch.manual_seed(0)
    fp.add_adapter(m, "p", fp.PrefixTuningConfig(**SMALL))
    assert m.config._attn_implementation == "fastpeft_eager"
    sdpa = with_prefix(kind)
    mask = torch.ones_like(IDS)
    mask[1, -2:] = 0
    assert rel_err(logits(m, attention_mask=mask), logits(sdpa, attention_mask=mask)) < 1e-5


@pytest.mark.parametrize("kind", FAMILIES)
def test_training_reduces_the_loss_and_trains_only_the_prefix(kind):
    m = with_prefix(kind)  # eval mode: the base model's dropout off, so the loss curve is not noise
    trained = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trained and all(".prefix_tuning." in f".{n}" for n in trained)
    losses = train(m, steps=8, lr=1e-2)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("kind", DECODERS + ["t5"])
def test_generation_with_cache_matches_recomputation(kind):
    m = with_prefix(kind)
    ids = IDS[:1]
    cached = m.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
    plain = m.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.tolist() == plain.tolist()


def test_kv_cache_holds_only_real_tokens():
    m = with_prefix("llama")
    with torch.no_grad():
        cache = m(input_ids=IDS, use_cache=True).past_key_values
    assert cache.get_seq_length() == IDS.shape[1]


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert", "t5"])
def test_gradient_checkpointing_gives_the_same_gradients(kind):
    m = with_prefix(kind, dropout=0.0)
    m.train()
    for module in m.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        elif isinstance(getattr(module, "dropout", None), float):  # T5's attention keeps its rate as a float
            module.dropout = 0.0

    def grads(model_):
        model_.zero_grad(set_to_none=True)
        model_(**batch(model_)).loss.backward()
        return {n: p.grad.clone() for n, p in model_.named_parameters() if p.requires_grad}

    plain = grads(m)
    m.gradient_checkpointing_enable()
    checkpointed = grads(m)
    assert plain.keys() == checkpointed.keys() and plain
    for name, g in plain.items():
        assert rel_err(checkpointed[name], g) < 1e-5, name


def test_torch_compile_fullgraph_matches_eager():
    m = with_prefix("llama")
    assert_compiled_matches_eager(m)


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_eject_keeps_outputs_and_shrinks_parameters(kind):
    m = with_prefix(kind)
    before, (_, total) = out(m), fp.trainable_parameters(m)
    fp.eject_prefix_tuning(m, "p")
    assert fp.adapters(m)["p"].flat
    assert rel_err(out(m), before) < 1e-6
    trainable, after = fp.trainable_parameters(m)
    assert after < total and trainable > 0


def test_gating_scales_the_prefix_per_row_and_trains():
    m = with_prefix("llama", use_gating=True, shared_gating=False)
    gates = [n for n, _ in m.named_parameters() if "prefix_gates" in n]
    assert gates and all(p.shape[0] == 2 for n, p in m.named_parameters() if n.endswith("prefix_gates.p.self_prefix_0"
                                                                                         ".weight"))
    losses = train(m, steps=6)
    assert losses[-1] < losses[0]
    assert all(site_of(x) is None or x.__dict__["_fastpeft_attention"].hidden is None for x in m.modules())


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_bfloat16_model_with_gating_and_lora_beside(kind):
    """Half-precision models keep float32 adapter parameters (gates included); LoRA on the same layers."""
    m = model(kind).to(torch.bfloat16)
    fp.add_adapter(m, "p", fp.PrefixTuningConfig(**SMALL, use_gating=True))
    fp.add_adapter(m, "l", fp.LoRAConfig(r=4, init_weights=False))
    fp.set_active_adapters(m, ["p", "l"])
    loss = m(**batch(m)).loss
    loss.backward()
    grads = [p.grad for n, p in m.named_parameters() if p.requires_grad]
    assert torch.isfinite(loss)
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any("prefix_gates" in n for n, p in m.named_parameters() if p.requires_grad)


def test_two_prefixes_stack_and_switch():
    m = with_prefix("llama")
    fp.add_adapter(m, "q", fp.PrefixTuningConfig(prefix_length=3, flat=True))
    one = out(m)
    fp.set_active_adapters(m, fp.Stack("p", "q"))
    both = out(m)
    fp.set_active_adapters(m, "q")
    assert rel_err(both, one) > 1e-4 and rel_err(out(m), one) > 1e-4
    fp.delete_adapter(m, "p")
    assert m.config._attn_implementation.startswith("fastpeft_")
    fp.delete_adapter(m, "q")
    assert m.config._attn_implementation == "sdpa" and sites(m) == 0 and not hasattr(m.model, "prefix_tuning")


@pytest.mark.parametrize("kind,options", [("llama", {}), ("t5", {}), ("bert", {"use_gating": True}),
                                          ("gpt2", {"flat": True, "leave_out": [0]})])
def test_save_load_round_trip_in_fastpeft_layout(tmp_path, kind, options):
    m = with_prefix(kind, **options)
    m.train()
    train(m, steps=2)
    m.eval()
    expected = out(m)
    fp.save_adapter(m, tmp_path, "p")
    assert (tmp_path / "adapter.safetensors").exists()
    fresh = model(kind)
    fp.load_adapter(fresh, tmp_path, "p")
    assert fp.adapters(fresh)["p"] == fp.adapters(m)["p"]
    assert torch.equal(out(fresh), expected)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "gpt2", "bert", "roberta"])
def test_peft_prefix_checkpoints_both_ways(tmp_path, kind):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    causal = kind in DECODERS
    theirs = peft.get_peft_model(model(kind), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM" if causal else "SEQ_CLS", num_virtual_tokens=4))
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.normal_()
        for p in theirs.parameters():
            if p.requires_grad:  # the prefix and, for SEQ_CLS, PEFT's trainable copy of the classifier
                p.add_(torch.randn_like(p) * 0.1)
    theirs.eval()
    theirs.save_pretrained(tmp_path / "peft")
    mask = torch.ones_like(IDS)
    if causal:
        mask[0, :2] = 0
    else:
        mask[0, -2:] = 0
    with torch.no_grad():
        expected = theirs(input_ids=IDS, attention_mask=mask).logits
    m = model(kind)
    fp.load_adapter(m, tmp_path / "peft", "p")
    assert fp.adapters(m)["p"].shift_positions and fp.adapters(m)["p"].flat
    got = logits(m, attention_mask=mask)
    if causal:
        assert rel_err(got[1], expected[1]) < 1e-5 and rel_err(got[0, 2:], expected[0, 2:]) < 1e-5
        ours = m.generate(IDS[:1], max_new_tokens=5, do_sample=False)
        assert ours.tolist() == theirs.generate(input_ids=IDS[:1], max_new_tokens=5, do_sample=False).tolist()
    else:
        assert fp.adapters(m)["p"].modules_to_save == ["classifier"]
        assert rel_err(got, expected) < 1e-5
    fp.save_adapter(m, tmp_path / "back", "p")
    again = peft.PeftModel.from_pretrained(model(kind), tmp_path / "back").eval()
    with torch.no_grad():
        assert rel_err(again(input_ids=IDS).logits, logits(m)) < 1e-5


def test_peft_t5_prefix_checkpoints_both_ways(tmp_path):
    """PEFT prefixes T5's decoder self-attention with positions shifted by P (the prefix keys get T5's relative
    position bias) and gives decoder layer l the rows of layer 2l mod n."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    theirs = peft.get_peft_model(model("t5"), peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4))
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.normal_()
    theirs.eval()
    theirs.save_pretrained(tmp_path / "peft")
    mask = torch.ones_like(IDS)
    mask[0, -2:] = 0
    decoder = IDS[:, :5]
    with torch.no_grad():
        expected = theirs(input_ids=IDS, attention_mask=mask, decoder_input_ids=decoder).logits
    m = model("t5")
    fp.load_adapter(m, tmp_path / "peft", "p")
    with torch.no_grad():
        got = m(input_ids=IDS, attention_mask=mask, decoder_input_ids=decoder).logits
    assert rel_err(got, expected) < 1e-5
    kwargs = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_scores=True)
    ours, reference = m.generate(input_ids=IDS[:1], **kwargs), theirs.generate(input_ids=IDS[:1], **kwargs)
    assert ours.sequences.tolist() == reference.sequences.tolist()
    assert rel_err(torch.stack(ours.scores), torch.stack(reference.scores)) < 1e-5
    fp.save_adapter(m, tmp_path / "back", "p")
    again = peft.PeftModel.from_pretrained(model("t5"), tmp_path / "back").eval()
    with torch.no_grad():
        assert rel_err(again(input_ids=IDS, decoder_input_ids=decoder).logits,
                       m(input_ids=IDS, decoder_input_ids=decoder).logits) < 1e-5
    own = with_prefix("t5", shift_positions=True, encoder_prefix=False, cross_prefix=False)
    fp.save_adapter(own, tmp_path / "own", "p")  # its layers differ where PEFT would read one row twice
    assert (tmp_path / "own" / "adapter.safetensors").exists()
    fresh = model("t5")
    fp.load_adapter(fresh, tmp_path / "own", "p")
    assert torch.equal(out(fresh), out(own))


def test_shifted_positions_save_in_peft_format(tmp_path):
    m = with_prefix("llama", shift_positions=True)
    expected = out(m)
    fp.save_adapter(m, tmp_path, "p")
    assert (tmp_path / "adapter_model.safetensors").exists()
    fresh = model("llama")
    fp.load_adapter(fresh, tmp_path, "p")
    assert rel_err(out(fresh), expected) < 1e-6


def test_bad_input_leaves_the_model_unchanged(tmp_path):
    m = model("opt")
    before, shape = snapshot(m), structure(m)
    with pytest.raises(fp.TargetError, match="no row for model_type='opt'"):
        fp.add_adapter(m, "p", fp.PrefixTuningConfig(**SMALL))
    assert structure(m) == shape and m.config._attn_implementation == "sdpa" and sites(m) == 0
    assert_same_state(m, before)
    m = model("llama")
    before, shape, count = snapshot(m), structure(m), hooks(m)
    with pytest.raises(fp.ConfigError, match="leave_out"):
        fp.add_adapter(m, "p", fp.PrefixTuningConfig(leave_out=[7]))
    flex = model("llama")
    flex.config._attn_implementation = "flex_attention"
    with pytest.raises(fp.TargetError, match="set_attn_implementation"):
        fp.add_adapter(flex, "p", fp.PrefixTuningConfig(**SMALL))
    assert flex.config._attn_implementation == "flex_attention" and sites(flex) == 0
    t5 = model("t5")
    with pytest.raises(fp.ConfigError, match="no attention layer is left"):
        fp.add_adapter(t5, "p", fp.PrefixTuningConfig(encoder_prefix=False, cross_prefix=False, leave_out=[0, 1]))
    assert structure(m) == shape and hooks(m) == count and sites(m) == 0 and sites(t5) == 0
    assert m.config._attn_implementation == "sdpa" and not fp.adapters(m)
    assert_same_state(m, before)
    other = with_prefix("llama", prefix_length=4, shift_positions=True)
    fp.save_adapter(other, tmp_path, "p")
    gpt2 = model("gpt2")
    before = snapshot(gpt2)
    with pytest.raises(fp.CheckpointError):
        fp.load_adapter(gpt2, tmp_path, "p")
    assert not fp.adapters(gpt2) and gpt2.config._attn_implementation == "sdpa" and sites(gpt2) == 0
    assert_same_state(gpt2, before)
