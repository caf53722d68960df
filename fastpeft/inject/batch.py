"""Multi-adapter batches on a model: one batch, a different adapter per row (or none), as PEFT's mixed batches.

    out = model(**inputs, adapter_names=["math", "__base__", "chat", "math"])   # one name per row
    out = model.generate(**inputs, adapter_names=[...], max_new_tokens=32)      # prefill and every decode step
    ids = fp.adapter_ids(model)                                                  # {"math": 0, "chat": 1, ...}
    with fp.adapter_batch(model, torch.tensor([0, -1, 1, 0])):                   # serving loops: indices, -1: none
        out = model(**inputs)

Inside a batch each row runs with its own adapter alone (LoRA of any rank, AdaLoRA, DoRA, IA3, prefix tuning,
LLaMA-Adapter, and several of these methods in one model), whatever set_active_adapters chose; a row never sees
another row's adapter. Gradients reach each row's adapter only (multi-tenant training: make the adapters
trainable with fp.set_active_adapters(model, names)). Names are resolved to ids and checked on the host once per
batch (modules/batch.py); adding or removing adapters does not disturb the ids of the others. A batch is current
for the thread (or asyncio task) that runs it: two threads serving two batches on one model do not mix.
"""
from __future__ import annotations

import contextlib

from torch import nn

from ..config import AdapterConfig
from ..modules.batch import NamedRows
from .state import AdapterState, require_state
from .wrapped import unwrap_model

BATCH_METHODS = {"lora", "adalora", "ia3", "prefix_tuning", "llama_adapter"}


def adapter_ids(model: nn.Module) -> dict[str, int]:
    """Each adapter's integer id: what fp.adapter_batch takes per row (-1: none). Stable while the adapter exists."""
    model = unwrap_model(model, "adapter_ids")
    return dict(require_state(model, "adapter_ids").batch.ids)


@contextlib.contextmanager
def adapter_batch(model: nn.Module, adapters, *, expand: bool = False):
    """Inside the block, row i of every forward uses adapters[i]: a name (None or "__base__": no adapter) or an id
    of fp.adapter_ids (-1: none), as a sequence or a 1-D integer tensor (a CPU tensor avoids a synchronisation).
    With `expand`, a layer's batch may be a multiple of the rows (each row repeated in place, as generate does for
    beams and return sequences). Yields the RowBatch."""
    model = unwrap_model(model, "adapter_batch")
    ctx = require_state(model, "adapter_batch").batch
    with ctx.running(ctx.make_batch(model, adapters, expand=expand, where="adapter_batch")) as batch:
        yield batch


def register(state: AdapterState, name: str, config: AdapterConfig) -> None:
    """Give a new adapter its id (and, for a method that cannot run in batches, the reason)."""
    state.batch.assign(name, refused=None if config.method in BATCH_METHODS else type(config).__name__)


def install(model: nn.Module, state: AdapterState) -> None:
    """Let the model take adapter_names= in forward and generate (removed by uninstall)."""
    rows = NamedRows(state.batch, model)
    base = getattr(model, "base_model", model)  # called alone (e.g. model.model(...)), it takes adapter_names too
    state.batch_hooks = [handle for m in dict.fromkeys([model, base]) if isinstance(m, nn.Module) for handle in (
        m.register_forward_pre_hook(rows.pre_forward, with_kwargs=True),
        m.register_forward_hook(rows.post_forward, with_kwargs=True, always_call=True))]
    if callable(getattr(type(model), "generate", None)):
        model.__dict__["generate"] = rows.generate


def uninstall(model: nn.Module, state: AdapterState) -> None:
    for handle in state.batch_hooks:
        handle.remove()
    state.batch_hooks = []
    generate = model.__dict__.get("generate")
    if isinstance(getattr(generate, "__self__", None), NamedRows):
        del model.__dict__["generate"]
