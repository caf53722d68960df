"""IA3 end to end on tiny random models of every supported family (no downloads): identity at init, training
reduces the loss, merge equals the unmerged output, unmerge restores the weights bit for bit, torch.compile."""
from __future__ import annotations

import pytest
import torch

import fastpeft as fp
from fastpeft.modules import IA3Linear

pytest.importorskip("transformers")
from tests.harness import rel_err  # noqa: E402
from tests.models.test_lora_models import HEADS  # noqa: E402
from tests.models.tiny import (  # noqa: E402
    BUILDERS, assert_compiled_matches_eager, assert_same_state, model, out, snapshot, train)

pytestmark = pytest.mark.filterwarnings("ignore")
FAMILIES = list(BUILDERS)


@pytest.mark.parametrize("kind", FAMILIES)
def test_identity_at_init(kind):
    m = model(kind)
    before = out(m)
    fp.add_adapter(m, "a", fp.IA3Config())
    assert any(isinstance(x, IA3Linear) for x in m.modules())
    assert torch.equal(out(m), before)


@pytest.mark.parametrize("kind", FAMILIES)
def test_training_steps_reduce_the_loss(kind):
    m = model(kind)
    frozen = snapshot(m)
    fp.add_adapter(m, "a", fp.IA3Config(modules_to_save=[HEADS.get(kind, "lm_head")]))
    losses = train(m)
    assert losses[-1] < 0.8 * losses[0], losses  # a few thousand parameters: slower than LoRA, still clear
    moved = [x.ia3_l["a"] for x in m.modules() if isinstance(x, IA3Linear)]
    assert all(not torch.equal(v, torch.ones_like(v)) for v in moved)
    fp.unload(m)
    assert_same_state(m, frozen)


def _adapted(kind, dtype=torch.float32):
    torch.manual_seed(0)
    m = model(kind).to(dtype)
    fp.add_adapter(m, "a", fp.IA3Config(init_weights=False))
    fp.add_adapter(m, "b", fp.IA3Config(init_weights=False))
    return m


@pytest.mark.parametrize("kind", FAMILIES)
def test_merge_equals_unmerged_output(kind):
    m = _adapted(kind)
    fp.set_active_adapters(m, ["a", "b"])
    adapted = out(m)
    assert rel_err(adapted, out(model(kind))) > 1e-3
    fp.merge_adapter(m, "a")
    fp.merge_adapter(m, "b")
    assert rel_err(out(m), adapted) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", FAMILIES)
def test_unmerge_restores_the_base_weights_bit_for_bit(kind, dtype):
    m = _adapted(kind, dtype)
    before, logits = snapshot(m), out(m)
    fp.merge_adapter(m, "a")
    assert any(not torch.equal(v, before[k]) for k, v in m.state_dict().items())
    fp.unmerge_adapter(m)
    assert_same_state(m, before)
    assert torch.equal(out(m), logits)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_ia3_llama_matches_eager(backend):
    assert_compiled_matches_eager(_adapted("llama"), backend)
