"""LoRA on fused expert tensors (LoRAConfig.target_parameters): identity, equality with PEFT (forward, gradients,
training), merge/unmerge, several adapters, multi-adapter batches, errors, and memory."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastpeft as fp
from fastpeft.errors import TargetError
from fastpeft.modules.moe_lora import LoRAExperts

from .moe_models import EXPERT_PARAMS, FAMILIES, ids, peft_model, rel, same_model, tiny_moe

pytest.importorskip("peft")


def _experts(model) -> LoRAExperts:
    return model.model.layers[0].mlp.experts


def _from_peft(family, tmp_path, **kwargs):
    """(fastpeft model with PEFT's random adapter loaded as 'x', the PEFT model)."""
    base = tiny_moe(family)
    fast = same_model(base)
    peft = peft_model(base, **kwargs)
    peft.save_pretrained(tmp_path)
    fp.load_adapter(fast, tmp_path, name="x")
    return fast, peft


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_init_is_the_identity_bit_for_bit(family):
    model = tiny_moe(family)
    x = ids()
    with torch.no_grad():
        before = model(x).logits
    fp.add_adapter(model, "a", fp.LoRAConfig(r=2, target_parameters=EXPERT_PARAMS))
    assert isinstance(_experts(model), LoRAExperts)
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_and_gradients_equal_peft(family, tmp_path):
    fast, peft = _from_peft(family, tmp_path)
    x = ids(1)
    out_p = peft(x, labels=x)
    out_f = fast(x, labels=x)
    assert rel(out_f.logits, out_p.logits) < 1e-5
    out_p.loss.backward()
    out_f.loss.backward()
    layer = _experts(fast)
    peft_experts = peft.base_model.model.model.layers[0].mlp.experts
    pairs = {"down_proj": peft_experts, "gate_up_proj": peft_experts.base_layer}
    for pname, wrapper in pairs.items():
        assert wrapper.parameter_name == pname
        for ours, theirs in ((layer.lora_A[pname]["x"], wrapper.lora_A["default"].weight),
                             (layer.lora_B[pname]["x"], wrapper.lora_B["default"].weight)):
            assert rel(ours.grad, theirs.grad) < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_three_sgd_steps_give_peft_losses(family, tmp_path):
    fast, peft = _from_peft(family, tmp_path)
    fast.train(), peft.train()
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5) for m in (fast, peft)]
    for step in range(3):
        x = ids(10 + step)
        losses = []
        for m, opt in zip((fast, peft), opts):
            opt.zero_grad()
            loss = m(x, labels=x).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_merge_unmerge_exact_and_unload(family):
    model = tiny_moe(family)
    base = same_model(model)
    fp.add_adapter(model, "a", fp.LoRAConfig(r=2, alpha=4, init_weights=False, target_parameters=EXPERT_PARAMS))
    x = ids(2)
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    with torch.no_grad():
        adapted = model(x).logits
        fp.merge_adapter(model, "a")
        assert rel(model(x).logits, adapted) < 1e-5
        assert not torch.equal(_experts(model).base_layer.gate_up_proj, weights["model.layers.0.mlp.experts.gate_up_proj"])
        fp.unmerge_adapter(model)
        assert torch.equal(model(x).logits, adapted)
    fp.unload(model)
    assert type(model.model.layers[0].mlp.experts).__name__ != "LoRAExperts"
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_unload_merge_keeps_the_update():
    model = tiny_moe("qwen3_moe")
    fp.add_adapter(model, "a", fp.LoRAConfig(r=2, init_weights=False, target_parameters=EXPERT_PARAMS))
    x = ids(3)
    with torch.no_grad():
        adapted = model(x).logits
        fp.unload(model, merge=True)
        assert rel(model(x).logits, adapted) < 1e-5


def test_two_active_adapters_add_up_and_delete():
    model = tiny_moe("mixtral")
    fp.add_adapter(model, "a", fp.LoRAConfig(r=2, init_weights=False, target_parameters=EXPERT_PARAMS))
    fp.add_adapter(model, "b", fp.LoRAConfig(r=3, init_weights=False, target_parameters=["down_proj"]))
    fp.set_active_adapters(model, ["a", "b"])
    x = ids(4)
    with torch.no_grad():
        both = model(x).logits
        fp.merge_adapter(model, "a")
        fp.merge_adapter(model, "b")
        assert rel(model(x).logits, both) < 1e-5
        fp.unmerge_adapter(model)
    fp.delete_adapter(model, "b")
    assert _experts(model).adapter_names == ["a"]
    fp.delete_adapter(model, "a")
    assert type(model.model.layers[0].mlp.experts).__name__ == "MixtralExperts"


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_multi_adapter_batch_rows_use_their_adapter(family):
    model = tiny_moe(family)
    fp.add_adapter(model, "a", fp.LoRAConfig(r=2, init_weights=False, target_parameters=EXPERT_PARAMS))
    fp.add_adapter(model, "b", fp.LoRAConfig(r=4, alpha=2, init_weights=False, target_modules=["q_proj"],
                                             target_parameters=["gate_up_proj"]))
    x = ids(5, rows=3)
    expected = []
    with torch.no_grad():
        for row, name in enumerate(["a", "b", None]):
            fp.set_active_adapters(model, name)
            expected.append(model(x[row:row + 1]).logits)
        with fp.adapter_batch(model, ["a", "b", None]):
            out = model(x).logits
    for row in range(3):
        assert rel(out[row:row + 1], expected[row]) < 1e-5


def test_generate_with_expert_adapters():
    model = tiny_moe("qwen3_moe")
    fp.add_adapter(model, "a", fp.LoRAConfig(r=2, init_weights=False, target_parameters=EXPERT_PARAMS))
    out = model.generate(ids(6, rows=2, length=4), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 7)
    with torch.no_grad():
        fp.merge_adapter(model, "a")
        merged = model.generate(ids(6, rows=2, length=4), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(out, merged)


def test_dropout_rslora_and_rank_pattern():
    model = tiny_moe("mixtral")
    config = fp.LoRAConfig(r=2, alpha=8, dropout=0.5, use_rslora=True, init_weights=False,
                           target_parameters=EXPERT_PARAMS, rank_pattern={"down_proj": 4})
    fp.add_adapter(model, "a", config)
    layer = _experts(model)
    assert layer.r["a"] == {"gate_up_proj": 2, "down_proj": 4}
    assert layer.lora_A["down_proj"]["a"].shape == (16, 48) and layer.lora_B["down_proj"]["a"].shape == (32, 16)
    assert layer.scaling["a"]["down_proj"] == pytest.approx(8 / 2)
    x = ids(7)
    with torch.no_grad():
        evals = model(x).logits, model(x).logits
    assert torch.equal(*evals)  # no dropout in eval mode
    model.train()
    loss = model(x, labels=x).loss
    loss.backward()
    assert torch.isfinite(layer.lora_A["gate_up_proj"]["a"].grad).all()
    with torch.no_grad():
        assert not torch.equal(model(x).logits, evals[0])


def test_target_parameters_with_target_modules():
    model = tiny_moe("mixtral")
    fp.add_adapter(model, "a", fp.LoRAConfig(r=2, target_modules=["q_proj", "o_proj"],
                                             target_parameters=["mlp.experts.down_proj"]))
    state = fp.adapters(model)
    assert "a" in state
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "LoRALinear"
    assert _experts(model).targets["a"] == ["down_proj"]


# ---------------------------------------------------------------------------------------------------- errors
def _unchanged(model, before):
    assert all(type(m).__name__ not in ("LoRAExperts", "LoRALinear") for m in model.modules())
    assert list(model.state_dict()) == before


def test_name_matching_nothing_lists_the_closest_parameters():
    model = tiny_moe("mixtral")
    before = list(model.state_dict())
    with pytest.raises(TargetError, match=r"'mlp\.experts\.gate_proj'.*closest.*'experts\.gate_up_proj'"):
        fp.add_adapter(model, "a", fp.LoRAConfig(target_parameters=["mlp.experts.gate_proj"]))
    _unchanged(model, before)


def test_non_expert_parameter_is_refused_with_its_shape():
    model = tiny_moe("mixtral")
    before = list(model.state_dict())
    with pytest.raises(TargetError, match=r"q_proj\.weight \(32, 32\).*not a fused expert tensor"):
        fp.add_adapter(model, "a", fp.LoRAConfig(target_parameters=["self_attn.q_proj.weight", "down_proj"]))
    _unchanged(model, before)
    with pytest.raises(TargetError, match=r"gate_up_proj_bias.*adaptable tensors are gate_up_proj, down_proj"):
        fp.add_adapter(tiny_moe("gpt_oss"), "a", fp.LoRAConfig(target_parameters=["gate_up_proj_bias"]))


def test_rank_larger_than_a_dimension_is_refused():
    model = tiny_moe("qwen3_moe")  # down_proj per expert: 32 x 24
    before = list(model.state_dict())
    with pytest.raises(TargetError, match=r"rank 25 .*down_proj.*r <= 24"):
        fp.add_adapter(model, "a", fp.LoRAConfig(r=25, target_parameters=EXPERT_PARAMS))
    _unchanged(model, before)


def test_dora_and_bias_are_refused():
    with pytest.raises(fp.ConfigError, match="use_dora"):
        fp.LoRAConfig(use_dora=True, target_parameters=EXPERT_PARAMS)
    with pytest.raises(fp.ConfigError, match="bias"):
        fp.LoRAConfig(bias="all", target_parameters=EXPERT_PARAMS)
    with pytest.raises(fp.ConfigError, match="target_parameters"):
        fp.LoRAConfig(target_parameters="mlp.experts.down_proj")


def test_failing_add_leaves_the_model_unchanged():
    model = tiny_moe("mixtral")
    before = list(model.state_dict())
    with pytest.raises(TargetError):  # the linear targets are fine, the rank of an expert tensor is not
        fp.add_adapter(model, "a", fp.LoRAConfig(r=8, target_modules=["q_proj"], target_parameters=EXPERT_PARAMS,
                                                 rank_pattern={"down_proj": 64}))
    _unchanged(model, before)


# ---------------------------------------------------------------------------------------------------- memory
class _Largest(TorchDispatchMode):
    """The largest new storage any op allocates (in elements; views and in-place results are not allocations)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_leaves

        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out


def _largest_allocation(r: int, experts: int, hidden: int, inter: int, tokens: int = 8) -> int:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=experts)
    torch.manual_seed(0)
    module = MixtralExperts(config)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.1)
    module.requires_grad_(False)
    from fastpeft.inject.families import experts_layout

    layer = LoRAExperts(module, experts_layout(module))
    layer.add_adapter("a", {"gate_up_proj": (r, 8.0), "down_proj": (r, 8.0)}, init_weights=False)
    layer.active_adapters = ["a"]
    x = torch.randn(tokens, hidden, requires_grad=True)
    index = torch.randint(0, experts, (tokens, 2))
    weights = torch.rand(tokens, 2)
    with _Largest() as probe:
        layer(x, index, weights).sum().backward()
    return probe.largest


def test_adapter_never_allocates_a_per_expert_delta():
    experts, hidden, inter = 16, 128, 128
    whole = experts * hidden * inter  # one expert stack: what forming every B_e A_e would allocate (x2 for gate_up)
    for r in (1, 8):
        largest = _largest_allocation(r, experts, hidden, inter)
        # the largest is an adapter tensor (or its gradient), B of gate_up (2·I, r·E), or an activation (tokens x 2·I)
        assert largest <= max(2 * inter * r * experts, 16 * 2 * inter), (r, largest)
        assert largest < whole / 4, (r, largest, whole)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_triton_backend_matches_the_reference(family):
    """The expert term on the Triton kernels (the interpreter on CPU; slot = expert) against the reference path:
    logits, and the gradients of every A and B (dropout off, so both paths compute one function)."""
    from fastpeft.ops import use_backend

    pytest.importorskip("triton")
    model = tiny_moe(family)
    fp.add_adapter(model, "a", fp.LoRAConfig(r=4, init_weights=False, target_parameters=EXPERT_PARAMS))
    layer = _experts(model)
    x = ids(3, rows=2, length=9)
    results = []
    for backend in ("torch", "triton"):
        model.zero_grad()
        with use_backend(backend):
            out = model(x, labels=x)
            out.loss.backward()
        grads = {(t, p): getattr(layer, t)[p]["a"].grad.clone()
                 for t in ("lora_A", "lora_B") for p in layer.targets["a"]}
        results.append((out.logits.detach(), grads))
    (ref_logits, ref_grads), (logits, grads) = results
    assert rel(logits, ref_logits) < 1e-5
    for key, g in ref_grads.items():
        assert g.abs().sum() > 0 and rel(grads[key], g) < 1e-4, key


def test_triton_backend_multi_adapter_batch():
    """A multi-adapter batch on the kernels (each adapter's pairs a subset of the rows, in place into the base)."""
    from fastpeft.ops import use_backend

    pytest.importorskip("triton")
    model = tiny_moe("mixtral")
    fp.add_adapter(model, "a", fp.LoRAConfig(r=2, init_weights=False, target_parameters=EXPERT_PARAMS))
    fp.add_adapter(model, "b", fp.LoRAConfig(r=4, alpha=2, init_weights=False, target_parameters=["down_proj"]))
    x = ids(5, rows=3)
    with torch.no_grad(), fp.adapter_batch(model, ["a", "b", None]):
        expected = model(x).logits
        with use_backend("triton"):
            out = model(x).logits
    assert rel(out, expected) < 1e-5
