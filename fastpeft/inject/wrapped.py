"""The model a public call works on when it is given a wrapped one, and what a sharded model refuses.

Every public function that takes a model starts with `unwrap_model(model, "fp_function")`:
- torch.compile's OptimizedModule -> `._orig_mod`; DataParallel, DistributedDataParallel (what accelerate's
  `prepare` returns in a multi-process run; a single process gets the model itself) and DeepSpeed's engine ->
  `.module`; nested wrappers are unwrapped in turn.
- DDP and DeepSpeed synchronise the gradients of the parameters that were trainable when they were built: a call
  that would change that set (adding or loading an adapter, activating others) is refused there, with the fix.
- FSDP1's FullyShardedDataParallel flattens the parameters fastpeft adapts: refused, pointing to FSDP2.
FSDP2's `fully_shard` keeps the module tree (its parameters become DTensor shards): calls that read or toggle
adapters work, `fp.save_adapter` gathers (checkpoint/gather.py), and calls that add, remove or fold adapters into
the weights are refused by `refuse_sharded`, which says what to do instead.

Nothing here imports torch.distributed or dynamo: a class that was never imported has no instances.
"""
from __future__ import annotations

import sys

from torch import nn

from ..errors import AdapterError

SYNCHRONISING = ("DistributedDataParallel", "DeepSpeedEngine")  # build their gradient sync from trainable parameters


def loaded(module: str, name: str):
    """Attribute `name` of module `module` if that module was imported (None if not): a class no code imported
    has no instances, so checking for it needs no import (of torch.distributed or dynamo, which take time)."""
    return getattr(sys.modules.get(module), name, None)


def unwrap_model(model, where: str, *, changes_trainable: bool = False) -> nn.Module:
    """The model inside the usual wrappers (the model itself when it has none). `changes_trainable`: the call
    changes which parameters train, which a DDP-style wrapper cannot follow (refused, naming the fix)."""
    compiled = loaded("torch._dynamo.eval_frame", "OptimizedModule")
    fsdp1 = loaded("torch.distributed.fsdp.fully_sharded_data_parallel", "FullyShardedDataParallel")
    inner = model
    while True:
        kind = type(inner).__name__
        if compiled is not None and isinstance(inner, compiled):
            inner = inner._orig_mod
        elif fsdp1 is not None and isinstance(inner, fsdp1):
            raise AdapterError(f"{where}: the model is wrapped by FSDP1 (FullyShardedDataParallel), which flattens "
                               "the parameters fastpeft adapts. Shard it with FSDP2 instead "
                               "(torch.distributed.fsdp.fully_shard; accelerate: fsdp_version=2), or call "
                               f"fp.{where} on the model before wrapping it.")
        elif isinstance(inner, nn.DataParallel) or kind in SYNCHRONISING:
            if changes_trainable and kind in SYNCHRONISING:
                raise AdapterError(f"{where}: {kind} synchronises the gradients of the parameters that were "
                                   "trainable when it was built, so this call would leave adapters training "
                                   f"unsynchronised (or fail in backward). Call fp.{where} on the model before "
                                   f"wrapping it (or on the wrapper's .module, then build a new {kind} around it).")
            inner = inner.module
        else:
            break
    if not isinstance(inner, nn.Module):
        raise AdapterError(f"{where}: expected a torch.nn.Module (e.g. a transformers model), got "
                           f"{type(model).__name__}; pass the model itself (the module the adapters were added to), "
                           "not its state_dict, a path or a config.")
    return inner


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 (`fully_shard`) manages part of the model, or any parameter is a DTensor."""
    fsdp2 = loaded("torch.distributed.fsdp", "FSDPModule")
    dtensor = loaded("torch.distributed.tensor", "DTensor")
    if fsdp2 is not None and any(isinstance(m, fsdp2) for m in model.modules()):
        return True
    return dtensor is not None and any(isinstance(p, dtensor) for p in model.parameters())


def refuse_sharded(model: nn.Module, where: str, *, adds: bool = False) -> None:
    """Raise when `model` is sharded: each rank holds a slice of every weight, and adapters added, removed or
    merged now would be out of FSDP's hands. `adds`: the call adds an adapter (the fix is to add it first)."""
    if not is_sharded(model):
        return
    if adds:
        fix = (f"add adapters before sharding: call fp.{where} on the model before fully_shard(...), which then "
               "shards and trains them with the rest.")
    else:
        fix = ("gather it first: fp.save_adapter(model, directory, name) on every rank (rank 0 writes the whole "
               "adapter), then fp.load_adapter(base, directory) into an unsharded copy of the base model and call "
               f"fp.{where} there.")
    raise AdapterError(f"{where}: this {type(model).__name__} is sharded (FSDP2 fully_shard or DTensor "
                       f"parameters), each rank holding a slice of its weights; {fix}")


def model_class(model: nn.Module) -> type:
    """The model's own class: FSDP2's fully_shard gives a module a subclass named FSDP<class> (what checkpoints
    record is the class the model was made with)."""
    fsdp2 = loaded("torch.distributed.fsdp", "FSDPModule")
    if fsdp2 is None or not isinstance(model, fsdp2):
        return type(model)
    return next(c for c in type(model).__mro__ if not issubclass(c, fsdp2))
