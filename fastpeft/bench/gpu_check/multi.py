"""The multi-adapter LoRA section: y_m = x_m Wᵀ + s_a (x_m A_aᵀ) B_aᵀ with a different adapter per batch row, 64
distinct rank-16 adapters, decode (B = 64 rows of one token) and prefill (B = 64 rows of 64 tokens) on the three
Llama-shaped linears, through fastpeft/bench/multi_adapter's case function (its docstrings: the implementations and
the cost model). Implementations: base (F.linear, the floor), fastpeft (multi_lora_linear, default dispatch),
fastpeft_cuda (the CUDA C++ decode kernel: decode rows, where the extension is built) and peft (lora.Linear's
mixed-batch forward). The base product of every multi-adapter path is cuBLAS's: no strategy to pin here.
"""
from __future__ import annotations

import torch

from ..multi_adapter import op, targets
from ..optional import load
from .context import Check
from .tier import FIRST

IMPLS = ("base", "fastpeft", "fastpeft_cuda", "peft")
COLD_BUILD_S = 150.0  # a cold build of the CUDA C++ extension; skipped when the section has less time than this


def cuda_extension(check: Check, tier: dict) -> tuple[bool, str]:
    """Whether fastpeft_cuda runs: the extension loads (built by the GPU tier, or now if the section has time)."""
    if not check.cuda:
        return False, f"the CUDA C++ kernel needs a CUDA device (running on {check.device.type})"
    failed = [f["test"] for f in tier.get("failures", []) if "test_cuda_ext_gpu" in f["test"]]
    built = tier.get("ran") and FIRST[0] in tier.get("files", []) and tier.get("passed", 0) > 0 and not failed
    if failed:
        return False, f"the GPU tier's extension tests failed ({failed[0]}, ...)"
    if not built and check.budget.left() < 2 * COLD_BUILD_S:
        return False, "the GPU tier did not build the extension and a cold build does not fit the time left"
    return op.cuda_ext_status(check.device)


def specs(plan: dict) -> list[dict]:
    """Decode then prefill on every shape: uniform over `adapters` distinct rank-16 adapters, all in the batch."""
    n = plan["adapters"]
    out = []
    for phase, B, L in (("decode", plan["decode_batch"], 1), ("prefill", plan["prefill_batch"], plan["prefill_len"])):
        out += [{"phase": phase, "K": K, "N": N, "B": B, "L": L, "scenario": "uniform", "n": n, "rank": "16"}
                for K, N in plan["shapes"]]
    return out


def run_multi(check: Check, tier: dict) -> None:
    plan = check.plan.multi
    impls = list(IMPLS)
    peft, why = load("peft.tuners.lora.layer", "Linear")
    if why:
        check.note(f"multi_lora: peft skipped: {why}")
        impls.remove("peft")
    usable, cuda_why = cuda_extension(check, tier)
    if not usable:
        check.note(f"multi_lora: fastpeft_cuda skipped: {cuda_why}")
        impls.remove("fastpeft_cuda")
    run = check.run_for("multi_adapter", impls, peft=peft, ctx={
        "pool": plan["pool"], "ref_dtype": torch.float32 if check.cuda else torch.float64})
    config = {**plan, "impls": impls, "rank": 16, "scales": "1, 1.5, 2 by slot", "cuda_ext": cuda_why,
              "strategies": "none: the base product of every multi-adapter path runs on cuBLAS"}
    cases = specs(plan)
    entry = check.run_cases("multi_lora", config, cases, lambda spec: op.run_case(run, spec),
                            lambda s: "{phase} K={K} N={N} B={B} L={L}".format(**s), op.columns())
    target = {"B": plan["decode_batch"], "n": plan["adapters"], "rank": "16"}
    entry["summary"] = targets.summary(entry["rows"], {"target": target}, plan["shapes"], check.cuda,
                                       check.peaks.bandwidth_gbps if check.peaks else None, run.elem)
    check.write()
