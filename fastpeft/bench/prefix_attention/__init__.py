"""Prefix-attention microbenchmark: torch SDPA without a prefix (the floor), fastpeft's prefix_attention and the
plain-PyTorch way (concatenate the prefix, SDPA with an explicit mask), in training and in decode; and one
prefix-tuning training step of a Llama model, fastpeft against PEFT.

    fastpeft bench prefix             # CUDA: Llama-7B attention, bf16, L 512..4096, P 10/30/100, then the model step
    fastpeft bench prefix --quick     # tiny fp32 cases, D 64 (the default without CUDA)
    fastpeft bench prefix --lengths 2048 --prefix-lengths 30 --modes fwdbwd,decode
    fastpeft bench prefix --modes step --model-lengths 2048 --prefix-kinds mlp   # the model only
    python -m fastpeft bench prefix --quick      # the same without the console script

Two sections, both in the default run (--modes fwd,fwdbwd,decode,step):
    op      modes fwd, fwd+bwd and decode: the attention op over (L, P) against the floor, with the goal
            fastpeft(L, P) <= (L + P) / L · floor(L) (prefix_attention/op.py: cases, implementations, cost model)
    step    mode step: one prefix-tuning training step of a random Llama, fastpeft vs PEFT vs the base model, with
            equal prefixes checked (prefix_attention/step.py)
JSON (benchmarks/results/<device>-prefix_attention-<date>.json, rewritten after every case): environment, "config"
and "rows" (op section), "summary" (the op goal per mode), "model_config", "model" and "model_summary" (step).
"""
from __future__ import annotations

from .. import driver
from . import op, step

IMPLS = tuple(dict.fromkeys(op.IMPLS + step.IMPLS))
MODES = {"fwd": "fwd", "forward": "fwd", "fwdbwd": "fwd+bwd", "fwd+bwd": "fwd+bwd", "train": "fwd+bwd",
         "decode": "decode", "step": step.MODE, "model": step.MODE}

FAMILY = driver.Benchmark(
    bench="prefix_attention", title="Prefix attention", doc=__doc__, impls=IMPLS,
    impls_help=" (peft: the model section only; its floor always runs)", modes=MODES,
    modes_help="fwd,fwdbwd,decode,step (default: all; step = the model section)",
    sections=(op.SECTION, step.SECTION), prepare=op.prepare, plot=op.plot)


def main(argv=None) -> int:
    return driver.main(FAMILY, argv)
