"""What the two-process runs (worker.py, qlora_worker.py) and the single-process references (test_multiprocess.py,
test_ddp_quantized.py) share: the tiny model, the adapters, the data and the training loop, so that both compute the
same thing; and starting the ranks as torchrun starts them."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import torch
import transformers
from safetensors.torch import load_file
from torch import nn

import fastpeft as fp

WORLD = 2
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT = 240  # seconds for both ranks together; a rank stuck in a collective gives up after 60 (worker.py)
STEPS, ROWS, TOKENS, LR = 3, 4, 8, 0.5  # global batch of ROWS rows; each of the WORLD ranks gets ROWS // WORLD
CONFIGS = {"lora": lambda: fp.LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
           "prefix": lambda: fp.PrefixTuningConfig(prefix_length=4, bottleneck_size=16)}


def build() -> nn.Module:
    """A tiny random Llama (two layers, hidden size 32)."""
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False))


def base(weights: str) -> nn.Module:
    """The tiny Llama with the weights in `weights` (a safetensors file of its state dict), in training mode."""
    model = build()
    model.load_state_dict(load_file(weights))
    return model.train()


def batches() -> torch.Tensor:
    """STEPS global batches of token ids: (STEPS, ROWS, TOKENS)."""
    return torch.randint(3, 100, (STEPS, ROWS, TOKENS), generator=torch.Generator().manual_seed(7))


def rows(rank: int | None) -> slice:
    """The rows of each global batch a rank trains on (None: all of them, a single-process run)."""
    if rank is None:
        return slice(None)
    per = ROWS // WORLD
    return slice(rank * per, (rank + 1) * per)


def train(run: nn.Module, rank: int | None) -> float:
    """STEPS of SGD on the trainable parameters of `run` (a model, or DDP/FSDP2 around it); the last loss.
    The loss is the mean over this rank's tokens; DDP and FSDP2 average the gradients over the ranks, which is the
    gradient of the global batch's mean (every row has as many tokens)."""
    opt = torch.optim.SGD([p for p in run.parameters() if p.requires_grad], lr=LR)
    loss = None
    for ids in batches()[:, rows(rank)]:
        loss = run(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss.item()


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batches()[0]).logits


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(out: str, module: str) -> list[tuple[subprocess.Popen, str]]:
    """WORLD processes of `python -m <module> <out>` with torchrun's environment; (process, log path) each."""
    port = _free_port()
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
        log = os.path.join(out, f"rank{rank}.log")
        with open(log, "w") as f:
            procs.append((subprocess.Popen([sys.executable, "-m", module, out], cwd=ROOT,
                                           env=env, stdout=f, stderr=subprocess.STDOUT), log))
    return procs


def finish_ranks(procs, deadline: float) -> list[str]:
    """Wait for the ranks; kill them all at the deadline or as soon as one fails. Returns the problems found."""
    problems = []
    try:
        while any(proc.poll() is None for proc, _ in procs) and not any(proc.poll() for proc, _ in procs):
            if time.monotonic() > deadline:
                problems.append(f"the ranks did not exit within {TIMEOUT} s")
                break
            time.sleep(0.2)
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    problems += [f"{log}: exit code {proc.returncode}" for proc, log in procs if proc.returncode]
    if problems:
        for _, log in procs:
            with open(log) as f:
                problems.append(f"--- {log} (tail)\n" + f.read()[-3000:])
            done = log.replace(".log", ".json")  # the checks that ran before the end
            if os.path.exists(done):
                with open(done) as f:
                    problems.append(f"--- {done}\n" + "\n".join(f"{k}: {v.strip().splitlines()[-1]}"
                                                                for k, v in json.load(f).items()))
    return problems
