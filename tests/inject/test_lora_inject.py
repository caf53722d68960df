"""fp.add_adapter and the adapter lifecycle on tiny Hugging Face models (built from configs, no downloads).

Targeting (names, regex, "all-linear", family defaults, exclusions, layer filters, rank/alpha patterns),
modules_to_save, bias modes, initialisation, trainability, and activate / disable / merge / delete / unload.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fastpeft as fp
from fastpeft.modules import LoRALinear, ModulesToSave

transformers = pytest.importorskip("transformers")
from tests.models.tiny import (  # noqa: E402
    IDS, assert_same_state, lora_paths, model, out, snapshot, trainable)

pytestmark = pytest.mark.filterwarnings("ignore")


def llama_paths(*leaves, layers=(0, 1)) -> set[str]:
    where = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
             "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    return {f"model.layers.{i}.{where[leaf]}.{leaf}" for i in layers for leaf in leaves}


LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ------------------------------------------------------------------------------------------------ targeting
def test_target_list_matches_name_suffixes():
    m = model()
    fp.add_adapter(m, "a", fp.LoRAConfig(r=4, target_modules=["q_proj", "self_attn.o_proj", "mlp.up_proj"]))
    assert lora_paths(m) == llama_paths("q_proj", "o_proj", "up_proj")
    assert isinstance(m.model.layers[0].self_attn.q_proj, LoRALinear)
    assert isinstance(m.model.layers[0].self_attn.k_proj, nn.Linear)
    # a full path matches itself only
    m = model()
    fp.add_adapter(m, "a", fp.LoRAConfig(target_modules=["model.layers.1.self_attn.k_proj"]))
    assert lora_paths(m) == {"model.layers.1.self_attn.k_proj"}


def test_target_list_does_not_match_partial_segment():
    """'proj' is not a suffix segment of 'q_proj': suffix matching works on whole dotted segments."""
    m = model()
    with pytest.raises(fp.TargetError):
        fp.add_adapter(m, "a", fp.LoRAConfig(target_modules=["proj"]))
    assert fp.adapters(m) == {}


def test_target_regex_fullmatches_the_path():
    m = model()
    fp.add_adapter(m, "a", fp.LoRAConfig(target_modules=r".*\.layers\.1\..*v_proj"))
    assert lora_paths(m) == {"model.layers.1.self_attn.v_proj"}
    m = model()
    fp.add_adapter(m, "a", fp.LoRAConfig(target_modules=r".*\.(q|k)_proj"))
    assert lora_paths(m) == llama_paths("q_proj", "k_proj")
    # fullmatch, not search: a regex for only the leaf name matches nothing
    with pytest.raises(fp.TargetError):
        fp.add_adapter(model(), "a", fp.LoRAConfig(target_modules=r"v_proj"))


def test_all_linear_llama_skips_lm_head():
    m = model()
    fp.add_adapter(m, "a", fp.LoRAConfig(target_modules="all-linear"))
    assert lora_paths(m) == llama_paths(*LLAMA_LINEAR)
    assert type(m.lm_head) is nn.Linear


def test_all_linear_bert_classifier_skips_head():
    m = model("bert")
    fp.add_adapter(m, "a", fp.LoRAConfig(target_modules="all-linear"))
    want = {f"bert.encoder.layer.{i}.{leaf}" for i in (0, 1)
            for leaf in ("attention.self.query", "attention.self.key", "attention.self.value",
                         "attention.output.dense", "intermediate.dense", "output.dense")} | {"bert.pooler.dense"}
    assert lora_paths(m) == want
    assert type(m.classifier) is nn.Linear


def test_all_linear_skips_linear_layers_inside_a_classifier_head_module():
    """RoBERTa's classifier is a module (dense + out_proj); its linear layers belong to the head."""
    m = model("roberta")
    fp.add_adapter(m, "a", fp.LoRAConfig(target_modules="all-linear"))
    paths = lora_paths(m)
    assert not any(p.startswith("classifier") for p in paths)
    assert "roberta.encoder.layer.1.output.dense" in paths and len(paths) == 12


def test_all_linear_gpt2_wraps_conv1d_not_lm_head():
    m = model("gpt2")
    fp.add_adapter(m, "a", fp.LoRAConfig(target_modules="all-linear"))
    assert lora_paths(m) == {f"transformer.h.{i}.{leaf}" for i in (0, 1)
                             for leaf in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert all(m.get_submodule(p).fan_in_fan_out for p in lora_paths(m))
    assert type(m.lm_head) is nn.Linear


@pytest.mark.parametrize("kind, want", [
    *[(kind, {f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")})
      for kind in ("llama", "mistral", "qwen2")],
    ("gpt2", {f"transformer.h.{i}.attn.c_attn" for i in (0, 1)}),
    *[(kind, {f"{kind}.encoder.layer.{i}.attention.self.{p}" for i in (0, 1) for p in ("query", "value")})
      for kind in ("bert", "roberta")],
    ("t5", {f"{stack}.block.{i}.layer.{j}.{att}.{p}" for i in (0, 1) for p in ("q", "v")
            for stack, j, att in (("encoder", 0, "SelfAttention"), ("decoder", 0, "SelfAttention"),
                                  ("decoder", 1, "EncDecAttention"))}),
    ("opt", {f"model.decoder.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")}),
])
def test_default_targets_per_family(kind, want):
    m = model(kind)
    fp.add_adapter(m, "a", fp.LoRAConfig(r=2))
    assert lora_paths(m) == want


def test_default_targets_unknown_family_is_an_error():
    m = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(fp.TargetError, match="target_modules"):
        fp.add_adapter(m, "a", fp.LoRAConfig())
    assert type(m[0]) is nn.Linear and fp.adapters(m) == {}


def test_exclude_modules():
    m = model()
    fp.add_adapter(m, "a", fp.LoRAConfig(target_modules="all-linear", exclude_modules=["down_proj", "k_proj"]))
    assert lora_paths(m) == llama_paths("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj")
    m = model()
    fp.add_adapter(m, "a", fp.LoRAConfig(target_modules=["q_proj", "v_proj"],
                                         exclude_modules=r"model\.layers\.0\..*"))
    assert lora_paths(m) == llama_paths("q_proj", "v_proj", layers=(1,))


@pytest.mark.parametrize("layers, pattern, want", [
    (1, None, (1,)), ([0], None, (0,)), ([0, 1], None, (0, 1)), (1, "layers", (1,)), ([0], ["layers"], (0,)),
])
def test_layers_to_transform(layers, pattern, want):
    m = model()
    fp.add_adapter(m, "a", fp.LoRAConfig(target_modules=["q_proj", "down_proj"], layers_to_transform=layers,
                                         layers_pattern=pattern))
    assert lora_paths(m) == llama_paths("q_proj", "down_proj", layers=want)


def test_layers_to_transform_bert_and_t5():
    m = model("bert")
    fp.add_adapter(m, "a", fp.LoRAConfig(layers_to_transform=1, layers_pattern="layer"))
    assert lora_paths(m) == {f"bert.encoder.layer.1.attention.self.{p}" for p in ("query", "value")}
    m = model("t5")
    fp.add_adapter(m, "a", fp.LoRAConfig(target_modules=["q"], layers_to_transform=0, layers_pattern="block"))
    assert lora_paths(m) == {"encoder.block.0.layer.0.SelfAttention.q", "decoder.block.0.layer.0.SelfAttention.q",
                             "decoder.block.0.layer.1.EncDecAttention.q"}


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.proj(x))


def test_layers_to_transform_with_index_at_start_of_path():
    """nn.Sequential paths start with the layer index: '0.proj', '1.proj', '2.proj'."""
    m = nn.Sequential(_Block(), _Block(), _Block())
    fp.add_adapter(m, "a", fp.LoRAConfig(target_modules=["proj"], layers_to_transform=[0, 2]))
    assert lora_paths(m) == {"0.proj", "2.proj"}
    assert isinstance(m[0].proj, LoRALinear) and type(m[1].proj) is nn.Linear
    m = nn.Sequential(_Block(), _Block(), _Block())
    fp.add_adapter(m, "a", fp.LoRAConfig(target_modules=["proj"], layers_to_transform=1))
    assert lora_paths(m) == {"1.proj"}
    with pytest.raises(fp.TargetError, match="3"):
        fp.add_adapter(nn.Sequential(_Block(), _Block()), "a",
                       fp.LoRAConfig(target_modules=["proj"], layers_to_transform=3))


def test_rank_and_alpha_pattern():
    m = model()
    cfg = fp.LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"],
                        rank_pattern={r"layers\.1\.self_attn\.q_proj": 2, "v_proj": 6},
                        alpha_pattern={"v_proj": 3})
    fp.add_adapter(m, "a", cfg)
    got = {p: (m.get_submodule(p).r["a"], m.get_submodule(p).scaling["a"]) for p in lora_paths(m)}
    assert got == {
        "model.layers.0.self_attn.q_proj": (4, 2.0),
        "model.layers.1.self_attn.q_proj": (2, 4.0),
        "model.layers.0.self_attn.v_proj": (6, 0.5),
        "model.layers.1.self_attn.v_proj": (6, 0.5),
    }
    assert m.model.layers[1].self_attn.q_proj.lora_A["a"].shape == (2, 32)
    assert m.model.layers[0].self_attn.v_proj.lora_B["a"].shape == (16, 6)


def test_rslora_scaling_through_config():
    m = model()
    fp.add_adapter(m, "a", fp.LoRAConfig(r=16, alpha=8, use_rslora=True, target_modules=["q_proj"]))
    assert m.model.layers[0].self_attn.q_proj.scaling["a"] == pytest.approx(8 / math.sqrt(16))


# ------------------------------------------------------------------------------------------------ modules_to_save
def test_modules_to_save_copy_is_trainable_original_untouched():
    m = model("bert")
    original = m.classifier
    w0 = original.weight.detach().clone()
    fp.add_adapter(m, "a", fp.LoRAConfig(r=2, modules_to_save=["classifier"]))
    holder = m.classifier
    assert isinstance(holder, ModulesToSave) and holder.original_module is original
    copy_ = holder.modules_to_save["a"]
    assert copy_ is not original and copy_.weight.data_ptr() != original.weight.data_ptr()
    assert all(p.requires_grad for p in copy_.parameters())
    assert not any(p.requires_grad for p in original.parameters())
    with torch.no_grad():
        copy_.weight.add_(1.0)
    assert torch.equal(original.weight, w0)
    base_out = out(m)
    with fp.disable_adapters(m):
        assert not torch.allclose(out(m), base_out)  # the copy ran, not the original
    fp.delete_adapter(m, "a")
    assert m.classifier is original and torch.equal(original.weight, w0)
    assert all(p.requires_grad for p in m.parameters())  # original flags restored


def test_modules_to_save_unload():
    m = model("bert")
    original = m.classifier
    fp.add_adapter(m, "a", fp.LoRAConfig(r=2, modules_to_save=["classifier"]))
    fp.unload(m)
    assert m.classifier is original
    m = model("bert")
    fp.add_adapter(m, "a", fp.LoRAConfig(r=2, modules_to_save=["classifier"]))
    copy_ = m.classifier.modules_to_save["a"]
    fp.unload(m, merge=True)
    assert m.classifier is copy_  # merge=True keeps the trained copy


@pytest.mark.parametrize("saved", [["q_proj"], ["layers.0.self_attn"]], ids=["same", "ancestor"])
def test_modules_to_save_overlapping_a_lora_target_is_an_error(saved):
    m = model()
    before, types = snapshot(m), [type(x) for x in m.modules()]
    with pytest.raises(fp.TargetError, match="modules_to_save"):
        fp.add_adapter(m, "a", fp.LoRAConfig(target_modules=["q_proj"], modules_to_save=saved))
    assert [type(x) for x in m.modules()] == types
    assert_same_state(m, before)
    assert fp.adapters(m) == {}
    assert all(p.requires_grad for p in m.parameters())


# ------------------------------------------------------------------------------------------------ bias
def _biased():
    return model("bert")


def test_bias_none():
    m = _biased()
    fp.add_adapter(m, "a", fp.LoRAConfig(bias="none"))
    assert not any(n.endswith("bias") for n in trainable(m))


def test_bias_all():
    m = _biased()
    fp.add_adapter(m, "a", fp.LoRAConfig(bias="all"))
    biases = {n for n, _ in m.named_parameters() if n.endswith(".bias")}
    assert len(biases) > 10
    assert {n for n in trainable(m) if n.endswith("bias")} == biases
    assert {n for n in trainable(m) if not n.endswith("bias")} == {
        n for n, _ in m.named_parameters() if ".lora_A." in n or ".lora_B." in n}


def test_bias_lora_only():
    m = _biased()
    fp.add_adapter(m, "a", fp.LoRAConfig(bias="lora_only"))
    assert {n for n in trainable(m) if n.endswith("bias")} == {
        f"bert.encoder.layer.{i}.attention.self.{p}.base_layer.bias" for i in (0, 1) for p in ("query", "value")}
    fp.set_active_adapters(m, None)
    assert trainable(m) == set()


# ------------------------------------------------------------------------------------------------ init
def test_default_init_is_identity():
    m = model()
    y0 = out(m)
    fp.add_adapter(m, "a", fp.LoRAConfig(r=4, target_modules="all-linear"))
    for p in lora_paths(m):
        layer = m.get_submodule(p)
        assert torch.count_nonzero(layer.lora_B["a"]) == 0
        assert torch.count_nonzero(layer.lora_A["a"]) == layer.lora_A["a"].numel()
        bound = 1 / math.sqrt(layer.in_features)  # kaiming_uniform(a=sqrt(5)) bound
        assert layer.lora_A["a"].abs().max() <= bound
    torch.testing.assert_close(out(m), y0, atol=1e-6, rtol=0)


def test_gaussian_init():
    m = model()
    fp.add_adapter(m, "a", fp.LoRAConfig(r=4, target_modules="all-linear", init_weights="gaussian"))
    a = torch.cat([m.get_submodule(p).lora_A["a"].flatten() for p in lora_paths(m)])
    b = torch.cat([m.get_submodule(p).lora_B["a"].flatten() for p in lora_paths(m)])
    assert a.numel() > 1000
    assert a.std().item() == pytest.approx(1 / 4, rel=0.1)
    assert abs(a.mean().item()) < 0.02
    assert torch.count_nonzero(b) == 0


def test_init_false_changes_output():
    m = model()
    y0 = out(m)
    fp.add_adapter(m, "a", fp.LoRAConfig(r=4, target_modules="all-linear", init_weights=False))
    assert all(torch.count_nonzero(m.get_submodule(p).lora_B["a"]) > 0 for p in lora_paths(m))
    assert not torch.allclose(out(m), y0, atol=1e-4)


def test_init_lora_weights_alias():
    cfg = fp.LoRAConfig(init_lora_weights=False, lora_alpha=32, lora_dropout=0.1)
    assert cfg.init_weights is False and cfg.alpha == 32 and cfg.dropout == 0.1


# ------------------------------------------------------------------------------------------------ trainability
def test_only_adapter_params_trainable_and_counts():
    m = model()
    total0 = sum(p.numel() for p in m.parameters())
    fp.add_adapter(m, "a", fp.LoRAConfig(r=4, target_modules="all-linear", modules_to_save=["lm_head"]))
    lora_names = {n for n, _ in m.named_parameters() if ".lora_A.a" in n or ".lora_B.a" in n}
    assert len(lora_names) == 2 * 14
    assert trainable(m) == lora_names | {"lm_head.modules_to_save.a.weight"}
    want = sum(4 * (m.get_submodule(p).in_features + m.get_submodule(p).out_features) for p in lora_paths(m))
    shapes = {"q_proj": (32, 32), "k_proj": (32, 16), "v_proj": (32, 16), "o_proj": (32, 32),
              "gate_proj": (32, 64), "up_proj": (32, 64), "down_proj": (64, 32)}
    assert want == 2 * sum(4 * (i + o) for i, o in shapes.values())
    head = 100 * 32
    assert fp.trainable_parameters(m) == (want + head, total0 + want + head)


def test_trainable_parameters_counts_shared_once():
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    m = transformers.LlamaForCausalLM(cfg)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    total0 = sum(p.numel() for p in m.parameters())
    fp.add_adapter(m, "a", fp.LoRAConfig(r=2, target_modules=["q_proj"]))
    assert fp.trainable_parameters(m) == (2 * 2 * 64, total0 + 2 * 2 * 64)


# ------------------------------------------------------------------------------------------------ lifecycle
def _two_adapters():
    m = model()
    fp.add_adapter(m, "a", fp.LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False))
    fp.add_adapter(m, "b", fp.LoRAConfig(r=2, alpha=4, target_modules=["v_proj", "down_proj"], init_weights=False))
    return m


def _names(m, adapter):
    return {n for n, _ in m.named_parameters() if f".lora_A.{adapter}" in n or f".lora_B.{adapter}" in n}


def test_second_adapter_inactive_and_switching():
    base = model()
    y0 = out(base)
    m = _two_adapters()
    assert list(fp.adapters(m)) == ["a", "b"]
    assert trainable(m) == _names(m, "a")
    assert m.model.layers[0].self_attn.v_proj.active_adapters == ["a"]
    y_a = out(m)
    fp.set_active_adapters(m, "b")
    assert trainable(m) == _names(m, "b")
    assert isinstance(m.model.layers[0].mlp.down_proj, LoRALinear)
    assert m.model.layers[0].self_attn.q_proj.active_adapters == []
    y_b = out(m)
    assert not torch.allclose(y_a, y_b, atol=1e-4)
    fp.set_active_adapters(m, ["a", "b"])
    assert trainable(m) == _names(m, "a") | _names(m, "b")
    y_ab = out(m)
    assert not torch.allclose(y_ab, y_a, atol=1e-4) and not torch.allclose(y_ab, y_b, atol=1e-4)
    fp.set_active_adapters(m, None)
    assert trainable(m) == set()
    torch.testing.assert_close(out(m), y0, atol=0, rtol=0)
    fp.set_active_adapters(m, ["a"])
    torch.testing.assert_close(out(m), y_a, atol=0, rtol=0)


def test_two_active_adapters_sum_their_updates_per_layer():
    m = _two_adapters()
    v = m.model.layers[0].self_attn.v_proj
    x = torch.randn(3, 32)
    fp.set_active_adapters(m, ["a", "b"])
    with torch.no_grad():
        got = v(x).double()
        base = v.base_layer(x).double()
        want = base + sum(v.scaling[n] * (x.double() @ v.lora_A[n].double().t()) @ v.lora_B[n].double().t()
                          for n in ("a", "b"))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_disable_adapters_context():
    y0 = out(model())
    m = _two_adapters()
    y = out(m)
    with fp.disable_adapters(m):
        torch.testing.assert_close(out(m), y0, atol=0, rtol=0)
    torch.testing.assert_close(out(m), y, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="boom"):
        with fp.disable_adapters(m):
            raise RuntimeError("boom")
    torch.testing.assert_close(out(m), y, atol=0, rtol=0)  # restored after an exception too


def test_delete_adapter_restores_originals():
    m = model()
    m.model.embed_tokens.weight.requires_grad_(False)  # a custom flag that must come back
    originals = {p: m.get_submodule(p) for p in llama_paths("q_proj", "v_proj", "down_proj")}
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    before = snapshot(m)
    y0 = out(m)
    fp.add_adapter(m, "a", fp.LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False))
    fp.add_adapter(m, "b", fp.LoRAConfig(r=2, target_modules=["v_proj", "down_proj"], init_weights=False))
    fp.set_active_adapters(m, ["a", "b"])
    fp.delete_adapter(m, "a")
    assert list(fp.adapters(m)) == ["b"]
    assert m.model.layers[0].self_attn.q_proj is originals["model.layers.0.self_attn.q_proj"]
    assert isinstance(m.model.layers[0].self_attn.v_proj, LoRALinear)
    assert m.model.layers[0].self_attn.v_proj.adapter_names == ["b"]
    assert trainable(m) == _names(m, "b")
    fp.delete_adapter(m, "b")
    assert fp.adapters(m) == {}
    for p, mod in originals.items():
        assert m.get_submodule(p) is mod
    assert not any(isinstance(x, (LoRALinear, ModulesToSave)) for x in m.modules())
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
    assert_same_state(m, before)
    torch.testing.assert_close(out(m), y0, atol=0, rtol=0)


def test_unload_without_merge_is_bit_identical():
    m = model()
    before = snapshot(m)
    originals = {p: m.get_submodule(p) for p in llama_paths(*LLAMA_LINEAR)}
    fp.add_adapter(m, "a", fp.LoRAConfig(r=4, target_modules="all-linear", init_weights=False))
    fp.add_adapter(m, "b", fp.LoRAConfig(r=2, target_modules=["q_proj"], init_weights=False))
    fp.merge_adapter(m, "a")
    fp.unload(m)
    assert fp.adapters(m) == {}
    for p, mod in originals.items():
        assert m.get_submodule(p) is mod
    assert_same_state(m, before)
    assert all(p.requires_grad for p in m.parameters())


def test_unload_with_merge_keeps_the_update():
    m = model()
    fp.add_adapter(m, "a", fp.LoRAConfig(r=4, target_modules="all-linear", init_weights=False))
    fp.add_adapter(m, "b", fp.LoRAConfig(r=2, target_modules=["q_proj"], init_weights=False))
    fp.set_active_adapters(m, ["a", "b"])
    y = out(m)
    fp.unload(m, merge=True)
    assert fp.adapters(m) == {}
    for p in llama_paths(*LLAMA_LINEAR):
        assert type(m.get_submodule(p)) is nn.Linear
    assert not any(isinstance(x, (LoRALinear, ModulesToSave)) for x in m.modules())
    assert set(m.state_dict()) == set(model().state_dict())
    torch.testing.assert_close(out(m), y, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(out(m), out(model()), atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_merge_unmerge_bit_for_bit(dtype):
    m = model().to(dtype)
    before = snapshot(m)
    fp.add_adapter(m, "a", fp.LoRAConfig(r=4, target_modules="all-linear", init_weights=False))
    fp.add_adapter(m, "b", fp.LoRAConfig(r=2, target_modules=["q_proj"], init_weights=False))
    fp.merge_adapter(m, "a")
    q = m.model.layers[0].self_attn.q_proj
    assert q.merged_adapters == ["a"]
    assert not torch.equal(q.base_layer.weight, before["model.layers.0.self_attn.q_proj.weight"])
    fp.merge_adapter(m, "b")
    assert q.merged_adapters == ["a", "b"]
    fp.unmerge_adapter(m)
    assert all(x.merged_adapters == [] for x in m.modules() if isinstance(x, LoRALinear))
    for name, t in before.items():
        now = m.get_parameter(name.replace("_proj.", "_proj.base_layer.")) if "_proj." in name else \
            m.state_dict()[name]
        assert now.dtype == dtype and torch.equal(now, t), name


def test_merge_output_matches_adapted_output():
    m = _two_adapters()
    fp.set_active_adapters(m, ["a", "b"])
    y = out(m)
    fp.merge_adapter(m, "a")
    torch.testing.assert_close(out(m), y, atol=1e-4, rtol=1e-4)
    fp.merge_adapter(m, "b")
    torch.testing.assert_close(out(m), y, atol=1e-4, rtol=1e-4)
    fp.unmerge_adapter(m)
    torch.testing.assert_close(out(m), y, atol=1e-5, rtol=1e-5)


def test_training_step_moves_only_adapters():
    m = model()
    m.train()
    before = snapshot(m)
    fp.add_adapter(m, "a", fp.LoRAConfig(r=4, dropout=0.1, target_modules="all-linear"))
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    loss = m(input_ids=IDS, labels=IDS).loss
    loss.backward()
    opt.step()
    b = m.model.layers[0].self_attn.q_proj.lora_B["a"]
    assert torch.count_nonzero(b) > 0
    fp.unload(m)
    assert_same_state(m, before)


def test_wrappers_follow_the_models_train_or_eval_mode():
    """An adapter added to a model in eval mode must not run dropout."""
    m = model()
    fp.add_adapter(m, "a", fp.LoRAConfig(r=4, dropout=0.5, target_modules=["q_proj"], init_weights=False,
                                         modules_to_save=["lm_head"]))
    assert not any(x.training for x in m.modules())
    assert torch.equal(out(m), out(m))
    m.train()
    fp.add_adapter(m, "b", fp.LoRAConfig(r=2, target_modules=["k_proj"]))
    assert all(x.training for x in m.modules())
