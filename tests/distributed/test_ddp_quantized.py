"""DDP over a bitsandbytes 4-bit base with real torch.distributed processes (two ranks on gloo, qlora_worker.py):
each rank trains the same starting LoRA adapter on its half of the batches; the adapter rank 0 saves equals the one
this process trains alone on the whole batches (DDP averages the ranks' gradients: the global batch's)."""
from __future__ import annotations

import os
import time

import pytest
import torch

import fastpeft as fp
from tests.distributed.common import TIMEOUT, finish_ranks, start_ranks, train
from tests.quantized import load_4bit

transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]


def test_ddp_on_a_4bit_base_trains_as_one_process(tmp_path):
    out = str(tmp_path)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)).save_pretrained(os.path.join(out, "llama"))
    start = load_4bit(os.path.join(out, "llama"))
    fp.add_adapter(start, "default", fp.LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                   init_weights=False))  # B random too: every gradient flows
    fp.save_adapter(start, os.path.join(out, "init"))
    procs = start_ranks(out, "tests.distributed.qlora_worker")
    try:  # the single-process run while the ranks run
        alone = fp.load_adapter(load_4bit(os.path.join(out, "llama")), os.path.join(out, "init"))
        alone.train()
        train(alone, None)
    finally:
        problems = finish_ranks(procs, time.monotonic() + TIMEOUT)
    if problems:
        pytest.fail("the two ranks did not finish:\n" + "\n".join(problems))
    ranks = fp.load_adapter(load_4bit(os.path.join(out, "llama")), os.path.join(out, "ddp"))
    ours = {n: p for n, p in alone.named_parameters() if p.requires_grad}
    theirs = dict(ranks.named_parameters())
    init = dict(fp.load_adapter(load_4bit(os.path.join(out, "llama")), os.path.join(out, "init")).named_parameters())
    assert ours and all(not torch.equal(p, init[n]) for n, p in ours.items())  # training moved every tensor
    for name, p in ours.items():
        torch.testing.assert_close(theirs[name], p, rtol=1e-4, atol=1e-6, msg=name)
