"""One rank of the two-process runs that test_multiprocess.py checks, started as torchrun would start it:

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python -m tests.distributed.worker DIR

DIR holds base.safetensors and the starting adapters (init_lora/, init_prefix/). Each scenario is a user's script:
load the adapter into the plain model, wrap it (DDP or FSDP2's fully_shard), train on this rank's half of every
global batch, save. What it saves goes to DIR/<scenario>/, and DIR/rank<r>.json says, per scenario and per check,
"ok" or the traceback.
"""
from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import sys
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import fastpeft as fp
from tests.distributed.common import CONFIGS, base, logits, train

RESULTS: dict[str, str] = {}


@contextlib.contextmanager
def check(name: str):
    """Record whether the block ran through (a failed check does not stop the scenario)."""
    try:
        yield
        RESULTS[name] = "ok"
    except Exception:
        RESULTS[name] = traceback.format_exc()


def refused(name: str, call, *words: str) -> None:
    """call() must raise a fastpeft error whose message has all `words`."""
    with check(name):
        try:
            call()
        except fp.FastPEFTError as exc:
            missing = [w for w in words if w not in str(exc)]
            assert not missing, f"{missing} not in: {exc}"
        else:
            raise AssertionError("no error raised")


def model_with(out: str, method: str):
    model = base(os.path.join(out, "base.safetensors"))
    fp.load_adapter(model, os.path.join(out, f"init_{method}"))  # before wrapping: DDP/FSDP2 then see it
    return model


def ddp(out: str, rank: int, method: str) -> None:
    model = model_with(out, method)
    run = DistributedDataParallel(model)
    train(run, rank)
    if rank == 0:  # the usual DDP habit: one rank saves, the others do not take part
        with check(f"ddp {method} save on rank 0"):
            fp.save_adapter(run, os.path.join(out, f"ddp_{method}"))
    if method == "lora":
        wrapper_calls(out, run, model)
    else:  # new parameters in place of the reparameterisation: DDP would not synchronise them
        refused("ddp eject_prefix_tuning refused", lambda: fp.eject_prefix_tuning(run, "default"), ".module")
    dist.barrier()


def wrapper_calls(out: str, run, model) -> None:
    """Every public call that takes a model, given the DDP wrapper."""
    with check("ddp adapters/adapter_ids/trainable_parameters"):
        assert list(fp.adapters(run)) == ["default"] and fp.adapter_ids(run) == {"default": 0}
        assert fp.trainable_parameters(run) == fp.trainable_parameters(model)
    with check("ddp set_active_adapters/disable_adapters/adapter_batch"):
        fp.set_active_adapters(run, "default")
        before = logits(run)
        with fp.disable_adapters(run):
            plain = logits(run)
        with fp.adapter_batch(run, ["default", None, "default", None]):
            mixed = logits(run)
        assert not torch.equal(before, plain)
        assert torch.allclose(mixed[0::2], before[0::2], atol=1e-5) and torch.allclose(mixed[1::2], plain[1::2],
                                                                                         atol=1e-5)
    with check("ddp merge_adapter/unmerge_adapter"):
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        fp.merge_adapter(run, "default")
        fp.unmerge_adapter(run)
        assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    refused("ddp add_adapter refused", lambda: fp.add_adapter(run, "x", CONFIGS["lora"]()), ".module",
            "before wrapping")
    refused("ddp load_adapter refused", lambda: fp.load_adapter(run, os.path.join(out, "init_lora"), name="x"),
            ".module")
    refused("ddp set_active_adapters(None) refused", lambda: fp.set_active_adapters(run, None), "before wrapping")
    with check("ddp unload"):
        assert fp.unload(run) is model and not fp.adapters(model)


def fsdp(out: str, rank: int, method: str) -> None:
    model = model_with(out, method)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    with check(f"fsdp {method} save before training"):  # the sharded copy of the starting adapter
        fp.save_adapter(model, os.path.join(out, f"fsdp_{method}_init"))
    train(model, rank)
    fp.save_adapter(model, os.path.join(out, f"fsdp_{method}"))  # every rank: gathered, rank 0 writes
    with check(f"fsdp {method} files exist on every rank after save"):
        assert os.listdir(os.path.join(out, f"fsdp_{method}"))
    if method == "lora":
        sharded_calls(out, rank, model)


def sharded_calls(out: str, rank: int, model) -> None:
    with check("fsdp adapters/trainable_parameters/set_active_adapters"):
        assert list(fp.adapters(model)) == ["default"]
        assert fp.trainable_parameters(model)[0] > 0
        fp.set_active_adapters(model, "default")
    local = {k: v.to_local().clone() for k, v in model.state_dict().items()}  # every entry is a shard
    for call, where in [(lambda: fp.merge_adapter(model, "default"), "merge_adapter"),
                        (lambda: fp.unload(model, merge=True), "unload"),
                        (lambda: fp.add_adapter(model, "x", CONFIGS["lora"]()), "add_adapter"),
                        (lambda: fp.load_adapter(model, os.path.join(out, "init_lora"), name="x"), "load_adapter")]:
        refused(f"fsdp {where} refused", call, "sharded", f"fp.{where}")
    with check("fsdp refusals changed nothing"):
        assert list(fp.adapters(model)) == ["default"]
        assert all(torch.equal(v.to_local(), local[k]) for k, v in model.state_dict().items())
    if rank == 0:  # merging after gathering: the saved adapter into an unsharded base model
        merged = base(os.path.join(out, "base.safetensors"))
        fp.load_adapter(merged, os.path.join(out, "fsdp_lora"))
        fp.merge_adapter(merged, "default")
        save_file({"logits": logits(merged)}, os.path.join(out, "fsdp_lora_merged.safetensors"))
    dist.barrier()


def fsdp_unshard(out: str, rank: int) -> None:
    """The model that used to crash: FSDP2 on the root only, saved after model.unshard()."""
    model = model_with(out, "lora")
    fully_shard(model)
    logits(model)
    model.unshard()
    fp.save_adapter(model, os.path.join(out, "fsdp_unshard"))
    logits(model)  # the model still runs


def accelerated(out: str, rank: int) -> None:
    """accelerate's prepare: DDP in a multi-process run (the model itself in a single process)."""
    from accelerate import Accelerator

    model = model_with(out, "lora")
    accelerator = Accelerator(cpu=True)
    run = accelerator.prepare(model)
    with check("accelerate prepare gives DDP, which fp calls take"):
        assert isinstance(run, DistributedDataParallel) and list(fp.adapters(run)) == ["default"]
        if accelerator.is_main_process:
            fp.save_adapter(run, os.path.join(out, "accelerate"))
    accelerator.wait_for_everyone()


SCENARIOS = {"ddp lora": lambda out, rank: ddp(out, rank, "lora"),
             "ddp prefix": lambda out, rank: ddp(out, rank, "prefix"),
             "fsdp lora": lambda out, rank: fsdp(out, rank, "lora"),
             "fsdp prefix": lambda out, rank: fsdp(out, rank, "prefix"),
             "fsdp unshard": fsdp_unshard,
             "accelerate": accelerated}


def main(out: str) -> None:
    faulthandler.enable()  # a crash leaves its stack in the rank's log
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))  # a rank left waiting fails, never hangs
    rank = dist.get_rank()
    for name, scenario in SCENARIOS.items():
        with check(name):
            scenario(out, rank)
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:  # after each scenario: what a crash leaves
            json.dump(RESULTS, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
