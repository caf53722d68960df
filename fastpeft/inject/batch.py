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
batch; adding or removing adapters does not disturb the ids of the others.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import AdapterError
from ..modules.batch import RowBatch
from .state import AdapterState, get_state, require_state

BASE = "__base__"  # PEFT's adapter name for a row without an adapter
BATCH_METHODS = {"lora", "adalora", "ia3", "prefix_tuning", "llama_adapter"}
_STACK = "_fastpeft_batch_stack"


def adapter_ids(model: nn.Module) -> dict[str, int]:
    """Each adapter's integer id: what fp.adapter_batch takes per row (-1: none). Stable while the adapter exists."""
    return dict(require_state(model, "adapter_ids").batch.ids)


@contextlib.contextmanager
def adapter_batch(model: nn.Module, adapters, *, expand: bool = False):
    """Inside the block, row i of every forward uses adapters[i]: a name (None or "__base__": no adapter) or an id
    of fp.adapter_ids (-1: none), as a sequence or a 1-D integer tensor (a CPU tensor avoids a synchronisation).
    With `expand`, a layer's batch may be a multiple of the rows (each row repeated in place, as generate does for
    beams and return sequences). Yields the RowBatch."""
    state = require_state(model, "adapter_batch")
    batch = make_batch(model, state, adapters, expand=expand, where="adapter_batch")
    with state.batch.running(batch):
        yield batch


def make_batch(model: nn.Module, state: AdapterState, adapters, *, expand: bool = False,
               where: str = "adapter_names") -> RowBatch:
    """The RowBatch of `adapters`, everything checked before any layer runs."""
    ids = state.batch.ids
    names_of = {i: n for n, i in ids.items()}
    if isinstance(adapters, torch.Tensor) or (isinstance(adapters, Sequence) and not isinstance(adapters, str) and
                                              adapters and all(isinstance(a, int) for a in adapters)):
        slots = _id_list(adapters, names_of, where)
        names = tuple(names_of.get(s) for s in slots)
    elif isinstance(adapters, Sequence) and not isinstance(adapters, str):
        names = tuple(None if a is None or a == BASE else a for a in adapters)
        state.check_known([n for n in names if n is not None], where)
        slots = tuple(-1 if n is None else ids[n] for n in names)
    else:
        raise AdapterError(f"{where}: expected one adapter per row (a list of names, None or '__base__' for no "
                           f"adapter, or a 1-D tensor of ids from fp.adapter_ids), got {type(adapters).__name__}.")
    if not slots:
        raise AdapterError(f"{where}: the batch has no rows; pass one adapter per row.")
    for name in sorted({n for n in names if n is not None}):
        method = state.configs[name].method
        if method not in BATCH_METHODS:
            raise AdapterError(f"{where}: adapter {name!r} is a {type(state.configs[name]).__name__}; multi-adapter "
                               f"batches take LoRA, AdaLoRA, DoRA, IA3, prefix tuning and LLaMA-Adapter adapters. "
                               "Run it in its own batch (fp.set_active_adapters).")
    merged = _merged(model)
    if merged:
        raise AdapterError(f"{where}: adapters are merged into the base weights of {merged}; a multi-adapter batch "
                           "needs them unmerged: call fp.unmerge_adapter(model) first.")
    return RowBatch(tuple(slots), names, state.batch.num_slots, expand=expand)


def _id_list(adapters, names_of: dict[int, str], where: str) -> tuple[int, ...]:
    if isinstance(adapters, torch.Tensor):
        if adapters.dim() != 1 or adapters.dtype.is_floating_point or adapters.dtype == torch.bool:
            raise AdapterError(f"{where}: expected a 1-D integer tensor of adapter ids, got {adapters.dtype} of shape "
                               f"{tuple(adapters.shape)}.")
        adapters = adapters.tolist()
    bad = [(i, s) for i, s in enumerate(adapters) if s != -1 and s not in names_of]
    if bad:
        i, s = bad[0]
        known = ", ".join(f"{n}={i}" for i, n in sorted(names_of.items())) or "none"
        raise AdapterError(f"{where}: adapter id {s} at row {i} names no adapter (ids: {known}; -1 for none).")
    return tuple(int(s) for s in adapters)


def _merged(model: nn.Module) -> str | None:
    from .api import wrappers

    paths = [p for p, m in wrappers(model) if getattr(m, "merged_adapters", None)]
    return None if not paths else paths[0] + (f" (and {len(paths) - 1} more)" if len(paths) > 1 else "")


# ------------------------------------------------------------------------------------------------------------
# model(..., adapter_names=...) and model.generate(..., adapter_names=...)
# ------------------------------------------------------------------------------------------------------------

def _pre_forward(model, args, kwargs):
    names = kwargs.pop("adapter_names", None)
    state = get_state(model)
    stack = model.__dict__.setdefault(_STACK, [])
    stack.append(None)  # popped by _post_forward, which runs even when this call fails
    if names is not None and state is not None:
        runner = state.batch.running(make_batch(model, state, names))
        runner.__enter__()
        stack[-1] = runner
    return args, kwargs


def _post_forward(model, args, kwargs, output):
    stack = model.__dict__.get(_STACK)
    runner = stack.pop() if stack else None
    if runner is not None:
        runner.__exit__(None, None, None)


class _Generate:
    """model.generate with adapter_names: the batch is current for the whole generation (prefill and decode), each
    row repeated as generate repeats it (beams, return sequences)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args, adapter_names=None, **kwargs):
        generate = type(self.model).generate
        if adapter_names is None:
            return generate(self.model, *args, **kwargs)
        with adapter_batch(self.model, adapter_names, expand=True):
            return generate(self.model, *args, **kwargs)


def install(model: nn.Module, state: AdapterState) -> None:
    """Let the model take adapter_names= in forward and generate (removed by uninstall)."""
    state.batch_hooks = [model.register_forward_pre_hook(_pre_forward, with_kwargs=True),
                         model.register_forward_hook(_post_forward, with_kwargs=True, always_call=True)]
    if callable(getattr(type(model), "generate", None)):
        model.__dict__["generate"] = _Generate(model)


def uninstall(model: nn.Module, state: AdapterState) -> None:
    for handle in state.batch_hooks:
        handle.remove()
    state.batch_hooks = []
    if isinstance(model.__dict__.get("generate"), _Generate):
        del model.__dict__["generate"]
    model.__dict__.pop(_STACK, None)
