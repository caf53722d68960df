"""Checkpoints of sharded models (FSDP2's `fully_shard`, DTensor parameters): gathered on every rank, written once.

    fp.save_adapter(model, "out/adapter")   # on every rank: each rank's shards are gathered, rank 0 writes

FSDP2 keeps each parameter as a DTensor shard and, while a module is unsharded (in its forward, or after
`model.unshard()`), a full parameter whose storage it frees again when it reshards (a `model.state_dict()` call
reshards too). A tensor taken from an unsharded module can therefore lose its data while a save still holds it,
and reading it then reads freed memory (the interpreter dies with SIGSEGV). So a save first reshards every FSDP2
module (`reshard_for_save`), then collects its tensors: they are DTensors, and `host_copies` gathers each in full
(`full_tensor()`, a collective: every rank must save, in the same order). Plain tensors are checked to still hold
their data before they are read. The files are then written by rank 0 alone and every rank learns whether that
worked (`write_once`), so that no rank returns before the files exist.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import CheckpointError
from ..inject.wrapped import loaded


def reshard_for_save(model: nn.Module) -> None:
    """Put every FSDP2 module of `model` back into its sharded state, as `model.state_dict()` would."""
    fsdp2 = loaded("torch.distributed.fsdp", "FSDPModule")
    if fsdp2 is None:
        return
    for module in model.modules():
        if isinstance(module, fsdp2):
            module.reshard()


def host_copies(tensors: dict[str, torch.Tensor], where: str) -> tuple[dict[str, torch.Tensor], torch.device | None]:
    """Own contiguous CPU copies of `tensors` (safetensors refuses tensors that share memory, e.g. tied weights);
    DTensors are gathered in full first. Also returns the device of the gathered DTensors (None: none was), which
    is where the ranks talk about the write (write_once)."""
    dtensor = loaded("torch.distributed.tensor", "DTensor")
    copies, gathered_on = {}, None
    for key, value in tensors.items():
        value = value.detach()
        if dtensor is not None and isinstance(value, dtensor):
            gathered_on = value.device
            value = value.full_tensor()
        else:
            _check_readable(value, key, where)
        copies[key] = value.to("cpu", copy=True).contiguous()
    return copies, gathered_on


def _check_readable(tensor: torch.Tensor, key: str, where: str) -> None:
    """Refuse a tensor without data (meta, or a storage freed under it) instead of reading past its storage."""
    if tensor.device.type == "meta":
        raise CheckpointError(f"{where}: tensor {key!r} is on the meta device and holds no values; load or "
                              "initialise the model's weights (e.g. model.to_empty(device=...) then the weights) "
                              "before saving.")
    if type(tensor) is not torch.Tensor or tensor.numel() == 0:
        return
    span = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    if tensor.untyped_storage().nbytes() < (tensor.storage_offset() + span) * tensor.element_size():
        raise CheckpointError(f"{where}: tensor {key!r} has lost its data (its storage was freed, as FSDP frees an "
                              "unsharded parameter when it reshards); pass the model itself to fp.save_adapter, "
                              "on every rank, and it gathers the shards.")


def write_once(gathered_on: torch.device | None, write: Callable[[], None], where: str) -> None:
    """Run `write` here, or for a checkpoint gathered from shards on rank 0 alone; then every rank learns whether
    it worked, so all of them return after the files exist, or all raise."""
    dist = torch.distributed
    if gathered_on is None or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        write()
        return
    failure = None
    if dist.get_rank() == 0:
        try:
            write()
        except Exception as exc:  # re-raised below, once the other ranks know
            failure = exc
    flag = torch.tensor([failure is None], dtype=torch.int32, device=gathered_on)
    dist.broadcast(flag, src=0)
    if failure is not None:
        raise failure
    if not flag.item():
        raise CheckpointError(f"{where}: rank 0 could not write the checkpoint (its error says why).")
