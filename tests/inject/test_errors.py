"""Bad input to the injection API: a clear error that names the field or module and the fix, and a model left
exactly as it was (same modules, same weights, same requires_grad flags, same adapters).

One row per kind of mistake lives in tests/test_error_catalogue.py; here: the same mistake over many values, the
rollback of a call that fails half way, and the checks that do not fit a row."""
from __future__ import annotations

import contextlib

import pytest
import torch

import fastpeft as fp
from fastpeft.modules import LoRALinear

pytest.importorskip("transformers")
from tests.models.tiny import model, out  # noqa: E402
from tests.test_error_catalogue import assert_unchanged, snapshot  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


@contextlib.contextmanager
def unchanged(m):
    """The body must raise (checked by the caller); afterwards the model must be as it was before (the error
    catalogue's snapshot: weights, hooks, module tree, flags, adapters and their bookkeeping)."""
    before = snapshot(m)
    yield
    assert_unchanged(before, snapshot(m))


def _with_adapter(**kw):
    m = model()
    fp.add_adapter(m, "a", fp.LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], **kw))
    return m


# ------------------------------------------------------------------------------------------------ config fields
@pytest.mark.parametrize("field, value, words", [
    ("r", 0, ["LoRAConfig.r", "positive integer"]),
    ("r", -3, ["LoRAConfig.r", "r=8"]),
    ("r", 2.5, ["LoRAConfig.r"]),
    ("r", True, ["LoRAConfig.r"]),
    ("dropout", -0.1, ["LoRAConfig.dropout", "[0, 1)"]),
    ("dropout", 1.0, ["LoRAConfig.dropout", "[0, 1)"]),
    ("dropout", 1.5, ["LoRAConfig.dropout"]),
    ("alpha", float("nan"), ["LoRAConfig.alpha", "finite"]),
    ("bias", "some", ["LoRAConfig.bias", "lora_only"]),
    ("init_weights", "xavier", ["LoRAConfig.init_weights", "gaussian"]),
    ("target_modules", "(unclosed", ["LoRAConfig.target_modules", "regular expression"]),
    ("target_modules", [""], ["LoRAConfig.target_modules"]),
    ("layers_to_transform", [-1], ["LoRAConfig.layers_to_transform"]),
    ("rank_pattern", {"q_proj": 0}, ["LoRAConfig.rank_pattern", "q_proj"]),
])
def test_bad_config_field(field, value, words):
    with pytest.raises(fp.ConfigError) as info:
        fp.LoRAConfig(**{field: value})
    for w in words:
        assert w in str(info.value)


@pytest.mark.parametrize("field, value", [("r", 0), ("dropout", 1.0), ("bias", "x")])
def test_config_changed_after_creation_is_checked_again(field, value):
    config = fp.LoRAConfig(target_modules=["q_proj"])
    setattr(config, field, value)
    m = _with_adapter()
    with unchanged(m), pytest.raises(fp.ConfigError, match=field):
        fp.add_adapter(m, "b", config)


# ------------------------------------------------------------------------------------------------ targets
@pytest.mark.parametrize("target", ["embed_tokens", "input_layernorm", "self_attn"])
def test_target_that_is_not_a_linear_layer(target):
    m = model()
    with unchanged(m), pytest.raises(fp.TargetError) as info:
        fp.add_adapter(m, "a", fp.LoRAConfig(target_modules=[target]))
    assert target in str(info.value)


# ------------------------------------------------------------------------------------------------ adapter names
@pytest.mark.parametrize("name", ["", "a.b", "two words", 3, None])
def test_unusable_adapter_name(name):
    m = model()
    with unchanged(m), pytest.raises(fp.AdapterError, match="name"):
        fp.add_adapter(m, name, fp.LoRAConfig(target_modules=["q_proj"]))


@pytest.mark.parametrize("call", [
    lambda m: fp.set_active_adapters(m, "a"),
    lambda m: fp.merge_adapter(m, "a"),
    lambda m: fp.unmerge_adapter(m),
    lambda m: fp.delete_adapter(m, "a"),
    lambda m: fp.unload(m),
    lambda m: fp.disable_adapters(m).__enter__(),
])
def test_lifecycle_call_on_a_model_without_adapters(call):
    m = model()
    with unchanged(m), pytest.raises(fp.AdapterError, match="add_adapter"):
        call(m)


# ------------------------------------------------------------------------------------------------ merge state
def test_merging_twice():
    m = _with_adapter(init_weights=False)
    fp.merge_adapter(m, "a")
    merged = out(m)
    with unchanged(m), pytest.raises(fp.AdapterError, match="already merged.*unmerge_adapter"):
        fp.merge_adapter(m, "a")
    assert torch.equal(out(m), merged)


# ------------------------------------------------------------------------------------------------ rollback
@pytest.mark.parametrize("existing", [False, True], ids=["fresh-model", "model-with-adapter"])
def test_failure_half_way_through_add_adapter_is_undone(existing, monkeypatch):
    """An error while injecting (here: on the third layer) undoes the layers already done."""
    m = _with_adapter() if existing else model()
    calls = []
    real = LoRALinear.add_adapter

    def failing(self, name, *args, **kw):
        calls.append(name)
        if name == "b" and calls.count("b") == 3:
            raise RuntimeError("injected failure")
        return real(self, name, *args, **kw)

    monkeypatch.setattr(LoRALinear, "add_adapter", failing)
    with unchanged(m), pytest.raises(RuntimeError, match="injected failure"):
        fp.add_adapter(m, "b", fp.LoRAConfig(target_modules=["q_proj", "k_proj"], modules_to_save=["lm_head"]))
    assert calls.count("b") == 3
    monkeypatch.undo()
    fp.add_adapter(m, "b", fp.LoRAConfig(target_modules=["q_proj", "k_proj"]))  # and the model is still usable
    assert "b" in fp.adapters(m)


def test_a_method_without_injection_yet():
    class FutureConfig(fp.AdapterConfig):
        method = "future"

    m = model()
    with unchanged(m), pytest.raises(fp.ConfigError, match="FutureConfig adapters cannot be injected yet"):
        fp.add_adapter(m, "a", FutureConfig())


def test_a_typo_on_a_wrapped_layer_is_an_attribute_error():
    """A wrapper answers what model code reads from a projection (weight, bias, sizes, Conv1D's nf/nx) and nothing
    else: a misspelt attribute is an AttributeError that names the wrapper and where the wrapped layer is."""
    m = model("gpt2")
    fp.add_adapter(m, "a", fp.LoRAConfig(r=2, target_modules=["c_attn"]))
    layer = m.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoRALinear)
    assert layer.nf == layer.base_layer.nf and layer.nx == layer.base_layer.nx
    assert layer.weight is layer.base_layer.weight and layer.bias is layer.base_layer.bias
    with pytest.raises(AttributeError, match=r"LoRALinear \(fastpeft's wrapper of Conv1D\) has no attribute "
                                             r"'wieght'.*\.base_layer"):
        layer.wieght
    assert not hasattr(layer, "reset_parameters")  # the base layer's methods are not the wrapper's


def test_a_failing_rank_allocator_step_moves_no_score():
    """update_and_allocate checks every gradient before it updates any importance score: a layer without a gradient
    fails the step and leaves the scores of the layers before it as they were."""
    m = model()
    fp.add_adapter(m, "a", fp.AdaLoRAConfig(total_step=10, target_modules=["q_proj"], init_weights=False))
    allocator = fp.RankAllocator(m, "a")
    m(input_ids=torch.randint(3, 100, (1, 4))).logits.square().mean().backward()
    m.model.layers[1].self_attn.q_proj.lora_A["a"].grad = None
    with pytest.raises(fp.AdapterError, match=r"layers\.1\.self_attn\.q_proj\.lora_A\.a has no gradient"):
        allocator.update_and_allocate(m, 1)
    assert allocator.sensitivity == {} and allocator.uncertainty == {}
