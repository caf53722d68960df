"""`torch.compile(model, fullgraph=True)` on a LoRA-injected tiny Llama on CPU: no graph breaks (fullgraph
raises on any), and the compiled forward and backward match eager."""
from __future__ import annotations

import pytest
import torch

import fastpeft as fp
from fastpeft.modules import LoRALinear

pytest.importorskip("transformers")
from tests.models.tiny import IDS, assert_compiled_matches_eager, model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


def _llama_with_lora(**kw):
    torch.manual_seed(0)
    m = model("llama")
    fp.add_adapter(m, "a", fp.LoRAConfig(r=4, alpha=8, target_modules="all-linear", init_weights=False, **kw))
    fp.add_adapter(m, "b", fp.LoRAConfig(r=2, target_modules=["q_proj"], init_weights=False))
    fp.set_active_adapters(m, ["a", "b"])  # two adapters on q_proj: the concatenated-rank path
    return m


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_lora_llama_matches_eager(backend):
    m = _llama_with_lora()
    grads = assert_compiled_matches_eager(m, backend)
    assert len(grads) == 2 * 7 * 2 + 2 * 2
    assert any(isinstance(x, LoRALinear) for x in m.modules())


def test_compiled_with_dropout_in_training_mode():
    """Dropout draws its seed inside the graph: still no graph break, and the masks differ per call."""
    torch._dynamo.reset()
    m = _llama_with_lora(dropout=0.5).train()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    first = compiled(input_ids=IDS).logits
    second = compiled(input_ids=IDS).logits
    assert torch.isfinite(first).all() and not torch.equal(first, second)
    first.float().pow(2).mean().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
