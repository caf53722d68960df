"""`torch.compile(model, fullgraph=True)` on a LoRA-injected tiny Llama on CPU: no graph breaks (fullgraph
raises on any), and the compiled forward and backward match eager."""
from __future__ import annotations

import pytest
import torch

import fastpeft as fp
from fastpeft.modules import LoRALinear

pytest.importorskip("transformers")
from tests.harness import rel_err  # noqa: E402
from tests.models.tiny import IDS, model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


def _llama_with_lora(**kw):
    torch.manual_seed(0)
    m = model("llama")
    fp.add_adapter(m, "a", fp.LoRAConfig(r=4, alpha=8, target_modules="all-linear", init_weights=False, **kw))
    fp.add_adapter(m, "b", fp.LoRAConfig(r=2, target_modules=["q_proj"], init_weights=False))
    fp.set_active_adapters(m, ["a", "b"])  # two adapters on q_proj: the concatenated-rank path
    return m


def _loss_and_grads(run, m, ids):
    """Logits of run(ids) and the gradients it leaves on m's trainable parameters (run: m or compiled m)."""
    m.zero_grad(set_to_none=True)
    logits = run(input_ids=ids).logits
    loss = logits.float().pow(2).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    return logits.detach(), grads


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_lora_llama_matches_eager(backend):
    torch._dynamo.reset()
    m = _llama_with_lora()
    eager_logits, eager_grads = _loss_and_grads(m, m, IDS)
    compiled = torch.compile(m, fullgraph=True, backend=backend)
    logits, grads = _loss_and_grads(compiled, m, IDS)
    assert rel_err(logits, eager_logits) < 1e-5
    assert grads.keys() == eager_grads.keys() and len(grads) == 2 * 7 * 2 + 2 * 2
    for name, g in grads.items():
        assert rel_err(g, eager_grads[name]) < 1e-4, name
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
