"""DoRA (fp.LoRAConfig(use_dora=True)) end to end on tiny random models of every family: identity at init,
training reduces the loss, merge equals the unmerged output and unmerge restores the weights bit for bit, the
layer on its own against the formula, and PEFT DoRA checkpoints both ways with matching outputs."""
from __future__ import annotations

import pytest
import torch

import fastpeft as fp
from fastpeft.modules import LoRALinear
from fastpeft.reference import dora as reference

peft = pytest.importorskip("peft")
from tests.harness import rel_err  # noqa: E402
from tests.inject.test_errors import unchanged  # noqa: E402
from tests.models.test_lora_models import HEADS  # noqa: E402
from tests.models.tiny import (  # noqa: E402
    BUILDERS, assert_compiled_matches_eager, assert_same_state, model, out, snapshot, train)

pytestmark = pytest.mark.filterwarnings("ignore")
FAMILIES = list(BUILDERS)


def _dora_layers(m):
    return [x for x in m.modules() if isinstance(x, LoRALinear) and x.lora_magnitude_vector]


@pytest.mark.parametrize("kind", FAMILIES)
def test_identity_at_init_and_magnitude_is_the_weight_norm(kind):
    m = model(kind)
    before = out(m)
    fp.add_adapter(m, "a", fp.LoRAConfig(r=4, use_dora=True, target_modules="all-linear"))
    layers = _dora_layers(m)
    assert layers and torch.equal(out(m), before)
    for layer in layers:
        w = layer.weight.t() if layer.fan_in_fan_out else layer.weight
        torch.testing.assert_close(layer.lora_magnitude_vector["a"], torch.linalg.vector_norm(w, dim=1))
        assert layer.lora_magnitude_vector["a"].requires_grad


def test_layer_matches_the_formula_with_a_trained_update():
    m = model("gpt2")  # Conv1D weights: the norm runs along the stored weight's first axis
    fp.add_adapter(m, "a", fp.LoRAConfig(r=3, alpha=6, use_dora=True, target_modules=["c_fc"], init_weights=False))
    layer = m.transformer.h[0].mlp.c_fc
    with torch.no_grad():
        layer.lora_magnitude_vector["a"].mul_(torch.rand_like(layer.lora_magnitude_vector["a"]) + 0.5)
    x = torch.randn(2, 5, 32)
    want = reference.dora_linear(x.double(), layer.weight.double(), layer.bias.double(),
                                 layer.lora_A["a"].double(), layer.lora_B["a"].double(), 2.0,
                                 layer.lora_magnitude_vector["a"].double(), True)
    assert rel_err(layer(x), want) < 1e-6


@pytest.mark.parametrize("kind", FAMILIES)
def test_training_steps_reduce_the_loss(kind):
    m = model(kind)
    frozen = snapshot(m)
    fp.add_adapter(m, "a", fp.LoRAConfig(r=4, use_dora=True, target_modules="all-linear",
                                         modules_to_save=[HEADS.get(kind, "lm_head")]))
    magnitudes = {id(x): x.lora_magnitude_vector["a"].detach().clone() for x in _dora_layers(m)}
    losses = train(m)
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(not torch.equal(x.lora_magnitude_vector["a"], magnitudes[id(x)]) for x in _dora_layers(m))
    fp.unload(m)
    assert_same_state(m, frozen)


def _trained(kind, dtype=torch.float32):
    torch.manual_seed(0)
    m = model(kind).to(dtype)
    fp.add_adapter(m, "a", fp.LoRAConfig(r=4, alpha=8, use_dora=True, target_modules="all-linear",
                                         init_weights=False))
    with torch.no_grad():
        for layer in _dora_layers(m):
            layer.lora_B["a"].mul_(0.05)
            layer.lora_magnitude_vector["a"].mul_(torch.rand_like(layer.lora_magnitude_vector["a"]) * 0.2 + 0.9)
    return m


@pytest.mark.parametrize("kind", FAMILIES)
def test_merge_equals_unmerged_output(kind):
    m = _trained(kind)
    adapted = out(m)
    assert rel_err(adapted, out(model(kind))) > 1e-3
    fp.merge_adapter(m, "a")
    assert rel_err(out(m), adapted) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert", "t5"])
def test_unmerge_restores_the_base_weights_bit_for_bit(kind, dtype):
    m = _trained(kind, dtype)
    before, logits = snapshot(m), out(m)
    fp.merge_adapter(m, "a")
    fp.unmerge_adapter(m)
    assert_same_state(m, before)
    assert torch.equal(out(m), logits)


def test_dora_runs_alone_on_its_layer():
    m = model()
    fp.add_adapter(m, "d", fp.LoRAConfig(r=2, use_dora=True, target_modules=["q_proj"]))
    fp.add_adapter(m, "l", fp.LoRAConfig(r=2, target_modules=["q_proj"]))
    fp.set_active_adapters(m, ["d", "l"])
    with pytest.raises(fp.AdapterError, match="runs alone"):
        out(m)
    fp.set_active_adapters(m, "l")
    fp.merge_adapter(m, "l")
    fp.set_active_adapters(m, ["d", "l"])
    out(m)  # a merged adapter does not run: fine


def _out(m):
    return out(m.get_base_model() if isinstance(m, peft.PeftModel) else m)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert", "t5"])
def test_peft_dora_checkpoint_both_ways(kind, tmp_path):
    targets = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"], "bert": ["query", "value"],
               "t5": ["q", "v", "wo"]}[kind]
    torch.manual_seed(0)
    pm = peft.get_peft_model(model(kind), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=targets,
                                                          init_lora_weights=False)).eval()
    pm.save_pretrained(tmp_path / "peft")
    m = model(kind)
    fp.load_adapter(m, tmp_path / "peft")
    assert rel_err(out(m), _out(pm)) < 1e-6
    with torch.no_grad():  # change it, so the way back carries fastpeft's own values
        for layer in _dora_layers(m):
            layer.lora_magnitude_vector["default"].mul_(1.1)
    fp.save_adapter(m, tmp_path / "fp")
    back = peft.PeftModel.from_pretrained(model(kind), tmp_path / "fp").eval()
    assert rel_err(_out(back), out(m)) < 1e-6


def test_compiled_dora_llama_matches_eager():
    assert_compiled_matches_eager(_trained("llama"), "aot_eager")


@pytest.mark.parametrize("target", ["embed_tokens", "input_layernorm"])
def test_dora_on_a_layer_that_is_not_linear(target):
    m = model()
    with unchanged(m), pytest.raises(fp.TargetError, match=target):
        fp.add_adapter(m, "a", fp.LoRAConfig(use_dora=True, target_modules=[target]))


def test_eval_cache_of_the_norm_follows_the_weights():
    """In eval mode the norm is cached; an optimizer-style update, a merge or train() invalidates it."""
    m = model()
    fp.add_adapter(m, "a", fp.LoRAConfig(r=3, use_dora=True, target_modules=["q_proj"], init_weights=False))
    layer = m.model.layers[0].self_attn.q_proj
    x = torch.randn(4, 32)

    def formula():
        return reference.dora_linear(x.double(), layer.weight.double(), None, layer.lora_A["a"].double(),
                                     layer.lora_B["a"].double(), layer.scaling["a"],
                                     layer.lora_magnitude_vector["a"].double(), False)

    assert rel_err(layer(x), formula()) < 1e-6 and layer._weight_norms  # cached in eval mode
    with torch.no_grad():
        layer.lora_B["a"].mul_(1.5)  # what optimizer.step() does
    assert rel_err(layer(x), formula()) < 1e-6
    m.train()
    assert not layer._weight_norms
    with torch.no_grad():
        layer.lora_B["a"].data.mul_(2.0)  # invisible to version counters: training never caches
    assert rel_err(layer(x), formula()) < 1e-6 and not layer._weight_norms
