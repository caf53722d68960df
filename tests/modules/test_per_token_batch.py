"""Per-token multi-adapter batches (RowBatch(per_token=True)): the packed (1, T) layout of continuous batching, where
the tokens of many requests share one row, each token routed to its own adapter."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fastpeft as fp
from fastpeft.inject.state import get_state
from fastpeft.modules.batch import RowBatch


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.k = nn.Linear(8, 8)

    def forward(self, x):
        return self.k(torch.relu(self.q(x)))


def _model():
    torch.manual_seed(0)
    model = Tiny().eval()
    fp.add_adapter(model, "a", fp.LoRAConfig(r=2, target_modules=["q", "k"]))
    fp.add_adapter(model, "b", fp.LoRAConfig(r=3, target_modules=["q"], use_dora=True))
    fp.add_adapter(model, "c", fp.IA3Config(target_modules=["k"], feedforward_modules=[]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(name.endswith(s) for s in (".a", ".b", ".c")):
                p.copy_(torch.randn(p.shape) * 0.5 + (1.0 if "ia3" in name else 0.0))
    return model


def test_each_packed_token_gets_its_own_adapter():
    model = _model()
    ctx = get_state(model).batch
    names = [None, "a", "a", "b", "c", None, "c", "b"]
    x = torch.randn(1, len(names), 8)
    slots = tuple(-1 if n is None else ctx.ids[n] for n in names)
    with ctx.running(RowBatch(slots, tuple(names), ctx.num_slots, per_token=True)):
        packed = model(x)
    for t, name in enumerate(names):
        if name is None:
            with fp.disable_adapters(model):
                alone = model(x[:, t:t + 1])
        else:
            fp.set_active_adapters(model, name)
            alone = model(x[:, t:t + 1])
        torch.testing.assert_close(packed[:, t:t + 1], alone, rtol=1e-5, atol=1e-6)


def test_per_token_batch_checks_the_token_count():
    model = _model()
    ctx = get_state(model).batch
    batch = ctx.make_batch(model, [0, 1, -1], per_token=True)
    with ctx.running(batch), pytest.raises(fp.AdapterError, match="one per token"):
        model(torch.randn(1, 4, 8))


def test_per_row_modules_refuse_a_per_token_batch():
    batch = RowBatch((0, 1), ("a", "b"), 2, per_token=True)
    with pytest.raises(fp.AdapterError, match="per row .*per token"):
        batch.row_names(1, "PrefixEncoder")
