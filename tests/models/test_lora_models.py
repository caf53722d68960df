"""LoRA end to end on tiny random models of every supported family (no downloads).

Per family: a zero-initialised adapter leaves the outputs unchanged, a few training steps reduce the loss,
the merged model computes what the unmerged one did, unmerge gives the base weights back bit for bit
(fp32, fp16, bf16), and unload returns the original modules.
"""
from __future__ import annotations

import pytest
import torch
import fastpeft as fp
from fastpeft.modules import LoRALinear

pytest.importorskip("transformers")
from tests.harness import rel_err  # noqa: E402
from tests.models.tiny import BUILDERS, assert_same_state, model, out, snapshot, train, trainable  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
FAMILIES = list(BUILDERS)


@pytest.mark.parametrize("kind", FAMILIES)
def test_zero_init_adapter_is_the_identity(kind):
    m = model(kind)
    before = out(m)
    fp.add_adapter(m, "a", fp.LoRAConfig(r=4, target_modules="all-linear"))
    assert any(isinstance(x, LoRALinear) for x in m.modules())
    assert torch.equal(out(m), before)


HEADS = {"bert": "classifier", "roberta": "classifier"}  # the others: lm_head


@pytest.mark.parametrize("kind", FAMILIES)
def test_training_steps_reduce_the_loss(kind):
    """LoRA on every linear layer plus a trainable copy of the (randomly initialised) head, as for a new task."""
    m = model(kind)
    frozen = snapshot(m)
    head = HEADS.get(kind, "lm_head")
    fp.add_adapter(m, "a", fp.LoRAConfig(r=4, alpha=8, target_modules="all-linear", modules_to_save=[head]))
    assert trainable(m) and all(".lora_" in n or ".modules_to_save.a." in n for n in trainable(m))
    losses = train(m)
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(B.abs().sum() > 0 for x in m.modules() if isinstance(x, LoRALinear) for B in x.lora_B.values())
    fp.unload(m)
    assert_same_state(m, frozen)  # the base weights never moved


def _adapted(kind, dtype=torch.float32):
    """Two adapters with non-zero updates (one active) on every linear layer, in `dtype`."""
    torch.manual_seed(0)
    m = model(kind).to(dtype)
    fp.add_adapter(m, "a", fp.LoRAConfig(r=4, alpha=8, target_modules="all-linear", init_weights=False))
    fp.add_adapter(m, "b", fp.LoRAConfig(r=2, alpha=2, target_modules="all-linear", init_weights=False))
    for x in m.modules():
        if isinstance(x, LoRALinear):
            for B in x.lora_B.values():
                B.data.mul_(0.05)  # updates of a realistic size, so that the merged output is well conditioned
    return m


@pytest.mark.parametrize("kind", FAMILIES)
def test_merge_equals_unmerged_output(kind):
    m = _adapted(kind)
    base = out(model(kind))
    adapted = out(m)
    assert rel_err(adapted, base) > 1e-3  # the adapter does change the output
    fp.merge_adapter(m, "a")
    assert all(x.merged_adapters == ["a"] for x in m.modules() if isinstance(x, LoRALinear))
    assert rel_err(out(m), adapted) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", FAMILIES)
def test_unmerge_restores_the_base_weights_bit_for_bit(kind, dtype):
    m = _adapted(kind, dtype)
    before, logits = snapshot(m), out(m)
    fp.merge_adapter(m, "a")
    fp.set_active_adapters(m, ["a", "b"])
    fp.merge_adapter(m, "b")
    changed = [k for k, v in m.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.endswith("base_layer.weight") for k in changed)
    fp.unmerge_adapter(m)
    assert_same_state(m, before)
    fp.set_active_adapters(m, "a")
    assert torch.equal(out(m), logits)


@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("kind", FAMILIES)
def test_unload(kind, merge):
    original = model(kind)
    m = _adapted(kind)
    adapted = out(m)
    fp.unload(m, merge=merge)
    assert not any(isinstance(x, LoRALinear) for x in m.modules())
    assert [type(x) for x in m.modules()] == [type(x) for x in original.modules()]
    assert fp.adapters(m) == {}
    if merge:
        assert rel_err(out(m), adapted) < 1e-5
    else:
        assert_same_state(m, snapshot(original))
