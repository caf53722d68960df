"""One rank of the 4-bit DDP run (test_ddp_quantized.py): `python -m tests.distributed.qlora_worker OUT` with
torchrun's environment. Loads the tiny Llama in bitsandbytes 4-bit NF4, the shared starting LoRA adapter, wraps it
in DDP (gloo), trains on this rank's half of the batches and saves the adapter (rank 0) to OUT/ddp."""
from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import fastpeft as fp
from tests.distributed.common import train
from tests.quantized import load_4bit


def main(out: str) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    model = fp.load_adapter(load_4bit(os.path.join(out, "llama")), os.path.join(out, "init"))
    model.train()
    train(DistributedDataParallel(model), rank)
    if rank == 0:
        fp.save_adapter(model, os.path.join(out, "ddp"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
