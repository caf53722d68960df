"""fp.add_adapter with fp.IA3Config: targets and feed-forward layers (defaults per family, lists, regexes),
errors that leave the model unchanged, IA3 beside LoRA, and the lifecycle (merge, unmerge, delete, unload)."""
from __future__ import annotations

import pytest
import torch

import fastpeft as fp
from fastpeft.modules import IA3Linear, LoRALinear

pytest.importorskip("transformers")
from tests.inject.test_errors import unchanged  # noqa: E402
from tests.models.tiny import assert_same_state, model, out, snapshot, trainable  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


def ia3_layers(m) -> dict[str, bool]:
    """path -> is_feedforward for every IA3 layer."""
    return {n: x.is_feedforward for n, x in m.named_modules() if isinstance(x, IA3Linear)}


def _layers(template: str, leaves: dict[str, bool], layers=(0, 1)) -> dict[str, bool]:
    return {template.format(i=i, leaf=leaf): ff for i in layers for leaf, ff in leaves.items()}


DEFAULTS = {
    "llama": _layers("model.layers.{i}.{leaf}", {"self_attn.k_proj": False, "self_attn.v_proj": False,
                                                 "mlp.down_proj": True}),
    "gpt2": _layers("transformer.h.{i}.{leaf}", {"attn.c_attn": False, "mlp.c_proj": True}),
    "bert": _layers("bert.encoder.layer.{i}.{leaf}", {"attention.self.key": False, "attention.self.value": False,
                                                      "attention.output.dense": True, "output.dense": True}),
    "t5": {**_layers("encoder.block.{i}.{leaf}", {"layer.0.SelfAttention.k": False,
                                                  "layer.0.SelfAttention.v": False, "layer.1.DenseReluDense.wo": True}),
           **_layers("decoder.block.{i}.{leaf}", {"layer.0.SelfAttention.k": False, "layer.0.SelfAttention.v": False,
                                                  "layer.1.EncDecAttention.k": False,
                                                  "layer.1.EncDecAttention.v": False,
                                                  "layer.2.DenseReluDense.wo": True})},
    "opt": _layers("model.decoder.layers.{i}.{leaf}", {"self_attn.k_proj": False, "self_attn.v_proj": False,
                                                       "fc2": True}),
}


@pytest.mark.parametrize("kind", list(DEFAULTS))
def test_default_targets_and_feedforward_layers(kind):
    """As PEFT: keys, values and the feed-forward output (PEFT's BERT 'output.dense' also names the attention
    output dense layer, so both scale their input)."""
    m = model(kind)
    before = out(m)
    fp.add_adapter(m, "a", fp.IA3Config())
    assert ia3_layers(m) == DEFAULTS[kind]
    assert torch.equal(out(m), before)  # vectors of ones: the identity
    assert trainable(m) == {f"{p}.ia3_l.a" for p in DEFAULTS[kind]}


def test_explicit_targets_list_and_regex():
    m = model()
    fp.add_adapter(m, "a", fp.IA3Config(target_modules=["q_proj", "up_proj", "down_proj"],
                                        feedforward_modules=["down_proj"]))
    assert ia3_layers(m) == _layers("model.layers.{i}.{leaf}", {"self_attn.q_proj": False, "mlp.up_proj": False,
                                                                "mlp.down_proj": True})
    m = model()
    fp.add_adapter(m, "a", fp.IA3Config(target_modules=r".*\.1\..*(o_proj|down_proj)",
                                        feedforward_modules=r".*down_proj"))
    assert ia3_layers(m) == {"model.layers.1.self_attn.o_proj": False, "model.layers.1.mlp.down_proj": True}


def test_layers_to_transform_and_exclude():
    m = model()
    fp.add_adapter(m, "a", fp.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                                        layers_to_transform=[1], exclude_modules=["k_proj"]))
    assert ia3_layers(m) == {"model.layers.1.mlp.down_proj": True}


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(target_modules=["k_proj"], feedforward_modules=["down_proj"]), fp.ConfigError, "not in target_modules"),
    (dict(feedforward_modules=["down_proj"]), fp.ConfigError, "without target_modules"),
    (dict(target_modules="all-linear"), fp.ConfigError, "all-linear"),
    (dict(init_weights="gaussian"), fp.ConfigError, "init_weights"),
])
def test_bad_config(kwargs, error, match):
    with pytest.raises(error, match=match):
        fp.IA3Config(**kwargs)


@pytest.mark.parametrize("config, match", [
    (dict(target_modules=["k_prj"]), "k_proj"),
    (dict(target_modules=r".*k_proj", feedforward_modules=["down_proj"]), "match none of the targeted"),
    (dict(target_modules=["k_proj"], modules_to_save=["layers.0.self_attn"]), "modules_to_save"),
])
def test_bad_targets_leave_the_model_unchanged(config, match):
    m = model()
    fp.add_adapter(m, "lora", fp.LoRAConfig(target_modules=["q_proj"]))
    with unchanged(m), pytest.raises(fp.TargetError, match=match):
        fp.add_adapter(m, "ia3", fp.IA3Config(**config))


def test_lora_and_ia3_nest_on_one_layer():
    """A layer takes LoRA and IA3 adapters, in either order: the IA3 layer wraps the LoRA layer."""
    m = model()
    fp.add_adapter(m, "lora", fp.LoRAConfig(target_modules=["v_proj"]))
    fp.add_adapter(m, "ia3", fp.IA3Config(target_modules=["v_proj"]))
    fp.add_adapter(m, "ia3k", fp.IA3Config(target_modules=["k_proj"]))
    fp.add_adapter(m, "lora2", fp.LoRAConfig(target_modules=["k_proj"]))
    attn = m.model.layers[0].self_attn
    for proj, lora, ia3 in ((attn.v_proj, "lora", "ia3"), (attn.k_proj, "lora2", "ia3k")):
        assert type(proj).__name__ == "IA3Linear" and type(proj.base_layer).__name__ == "LoRALinear"
        assert proj.adapter_names == [ia3] and proj.base_layer.adapter_names == [lora]
    with unchanged(m), pytest.raises(fp.ConfigError):
        fp.add_adapter(m, "bad", fp.LoRAConfig(r=0, target_modules=["k_proj"]))


def test_a_second_ia3_adapter_must_scale_the_same_side():
    m = model()
    fp.add_adapter(m, "a", fp.IA3Config(target_modules=["down_proj"], feedforward_modules=["down_proj"]))
    with unchanged(m), pytest.raises(fp.TargetError, match="scale its input"):
        fp.add_adapter(m, "b", fp.IA3Config(target_modules=["down_proj"], feedforward_modules=[]))


def test_ia3_beside_lora_both_active():
    m = model()
    fp.add_adapter(m, "lora", fp.LoRAConfig(r=2, target_modules=["q_proj"], init_weights=False))
    fp.add_adapter(m, "ia3", fp.IA3Config(init_weights=False))
    lora_only = out(m)
    fp.set_active_adapters(m, ["lora", "ia3"])
    both = out(m)
    assert not torch.allclose(both, lora_only)
    names = trainable(m)
    assert any(".lora_A.lora" in n for n in names) and any(".ia3_l.ia3" in n for n in names)
    fp.set_active_adapters(m, "ia3")
    assert not any(".lora_" in n for n in trainable(m))


def test_lifecycle_merge_unmerge_delete_unload():
    m = model()
    base_state, base_out = snapshot(m), out(m)
    fp.add_adapter(m, "a", fp.IA3Config(init_weights=False))
    fp.add_adapter(m, "b", fp.IA3Config(init_weights=False))
    fp.set_active_adapters(m, ["a", "b"])
    adapted = out(m)
    fp.merge_adapter(m, "a")
    fp.merge_adapter(m, "b")
    torch.testing.assert_close(out(m), adapted, atol=1e-5, rtol=1e-5)
    with pytest.raises(fp.AdapterError, match="already merged"):
        fp.merge_adapter(m, "a")
    fp.unmerge_adapter(m)
    assert torch.equal(out(m), adapted)
    fp.delete_adapter(m, "b")
    assert set(fp.adapters(m)) == {"a"} and all(x.adapter_names == ["a"] for x in m.modules()
                                                if isinstance(x, IA3Linear))
    merged = model()
    fp.add_adapter(merged, "a", fp.IA3Config(init_weights=False))
    for layer in (x for x in merged.modules() if isinstance(x, IA3Linear)):  # same vectors as m's adapter a
        path = next(n for n, y in merged.named_modules() if y is layer)
        layer.ia3_l["a"].data.copy_(m.get_submodule(path).ia3_l["a"])
    a_out = out(merged)
    fp.unload(merged, merge=True)
    assert not any(isinstance(x, (IA3Linear, LoRALinear)) for x in merged.modules())
    torch.testing.assert_close(out(merged), a_out, atol=1e-5, rtol=1e-5)
    fp.unload(m)
    assert_same_state(m, base_state)
    assert torch.equal(out(m), base_out)
