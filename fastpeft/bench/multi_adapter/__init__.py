"""Multi-adapter LoRA serving benchmark: one batch, a different adapter per row; fastpeft's multi_lora_linear against
the base linear (the floor), PEFT's mixed-batch forward, a plain-PyTorch loop and a padded-bmm baseline.

    fastpeft bench multi                  # CUDA: Llama-7B linears, bf16, op section + serving loop
    fastpeft bench multi --quick          # tiny fp32 cases and a tiny model (the default without CUDA)
    fastpeft bench multi --phases decode --shapes 4096x4096 --batches 64 --ranks 16 --modes op
    fastpeft bench multi --modes serve    # the serving loop only
    python -m fastpeft bench multi --quick    # the same without the console script

Two sections, both in the default run (--modes op,serve):
    op      the linear layer, y_m = x_m Wᵀ + s_a (x_m A_aᵀ) B_aᵀ with a = the adapter of row m, over a sparse cross
            product of shapes, phases (decode, prefill, train), batch sizes, adapter popularity and ranks, every
            implementation checked and timed on the same inputs; the targets on the Llama-7B decode case
            (multi_adapter/op.py; the cases and the cost model in cases.py, the implementations in impls.py, the
            targets in targets.py)
    serve   tokens/s of model.generate, 64 requests over 64 rank-16 adapters, against the base model and PEFT
            (multi_adapter/serve.py)
On the CPU (and with --quick) torch runs on one thread (--threads): the reference path's index_add stalls ~0.1 s
per call with two OpenMP threads on a loaded machine; CPU figures only check that everything runs.
JSON (benchmarks/results/<device>-multi_adapter-<date>.json, rewritten after every case): environment, "config",
"cuda_ext", "peaks", "rows" (op section), "summary" (targets, decode kernel choice), "serve_config", "serve",
"serve_summary".
"""
from __future__ import annotations

import argparse

import torch

from .. import driver
from . import op, serve
from .impls import IMPLS
from .targets import TARGETS


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, help="CPU: torch.set_num_threads (default 1 with --quick, else torch's)")


def prepare(run: driver.Run) -> tuple[str, dict]:
    """CPU: one torch thread with --quick (or --threads), short timings; then the op section's settings."""
    if not run.cuda and (run.args.threads or run.quick):
        torch.set_num_threads(run.args.threads or 1)  # quick: one thread (OpenMP stalls for ~0.1 s on a loaded machine)
    if not run.cuda and run.quick and run.args.rep_ms is None:
        run.timer.rep_ms = 40.0  # tiny CPU cases: the figures are not the point
    banner, entries = op.prepare(run)
    entries["config"]["targets"] = {**TARGETS, "serve_throughput": serve.TARGET}
    return banner, entries


FAMILY = driver.Benchmark(
    bench="multi_adapter", title="Multi-adapter LoRA", doc=__doc__, impls=IMPLS,
    impls_help=" (serve uses base, fastpeft, peft)", modes={op.MODE: op.MODE, serve.MODE: serve.MODE},
    modes_help="op (the linear layer) and/or serve (the serving loop); default both",
    sections=(op.SECTION, serve.SECTION), options=options, prepare=prepare, plot=op.plot)


def main(argv=None) -> int:
    return driver.main(FAMILY, argv)
