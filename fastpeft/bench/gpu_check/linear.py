"""The linear ops' sections: LoRA, DoRA and IA3, each with both strategies pinned, PEFT's layer and the base op
side by side, forward ("fwd", under no_grad) and forward+backward ("fwd+bwd": autograd.grad of a fixed dY), on the
inputs, references and cost models of fastpeft/bench/lora.py, dora.py and ia3.py (their docstrings have the flops
and bytes formulas), through grid.time_case.

Implementations (x: M x K, W: N x K frozen, no bias):
    base     F.linear(x, W) on cuBLAS, the floor
    fused    the fastpeft op under use_kernel_options(linear_strategy="fused")
    cublas   the fastpeft op under use_kernel_options(linear_strategy="cublas")
    peft     PEFT's layer around nn.Linear (lora.Linear; with use_dora=True; ia3.Linear), storage shared
LoRA: y = x Wᵀ + s (drop_p(x) Aᵀ) Bᵀ, s = alpha / r = 2, p in {0, 0.05} (PEFT's lora_dropout the same p; with p > 0
the outputs are random, so those rows carry no rel_err). DoRA: y = m / ‖W + s B A‖ ⊙ (x Wᵀ + s x Aᵀ Bᵀ).
IA3: y = (x Wᵀ) ⊙ v ("out") or (x ⊙ u) Wᵀ ("in").
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from .. import dora, ia3, lora
from ..grid import columns, time_case
from ..optional import load
from ..report import Column
from ..roofline import Row
from .context import STRATEGIES, Check, SectionFamily, without_check

IMPLS = ("base", *STRATEGIES, "peft")
SCALE = 2.0  # alpha / r with alpha = 2r


def strategy_hooks(check: Check, forward, grad_inputs):
    """(forward, grad_inputs) of a family with each strategy impl running the family's "fastpeft" under its pin."""
    def pinned_forward(impl, item):
        if impl in STRATEGIES:
            with check.pinned(impl):
                return forward("fastpeft", item)
        return forward(impl, item)

    def pinned_grad_inputs(impl, item):
        return grad_inputs("fastpeft" if impl in STRATEGIES else impl, item)

    return pinned_forward, pinned_grad_inputs


def with_case(rows: list[Row], **extra) -> list[Row]:
    """The rows with `extra` entries added to their case (a case key beside the family's axis, e.g. dropout)."""
    for row in rows:
        row.case = {**row.case, **extra}
    return rows


def peft_impls(check: Check, module: str, wrap=None) -> tuple[list[str], type | None]:
    """IMPLS and PEFT's layer class (wrapped), or IMPLS without peft and a note where PEFT does not import."""
    cls, why = load(module, "Linear")
    if why:
        check.note(f"peft skipped: {why}")
        return [i for i in IMPLS if i != "peft"], None
    return list(IMPLS), (wrap(cls) if wrap else cls)


def lora_case(check: Check, run, K: int, N: int, M: int, r: int, p: float) -> list[Row]:
    """One LoRA case (fastpeft/bench/lora.py's inputs and formulas), dropout p on fastpeft's op and PEFT's layer."""
    from fastpeft.ops import lora_linear

    ref_dtype = torch.float64 if not check.cuda else torch.float32

    def make_item():
        item = lora.make_item(M, K, N, r, check.dtype, check.device, need_dy=True, peft_linear=run.peft)
        if p and "peft" in item:
            item["peft"].lora_dropout["default"] = nn.Dropout(p)  # the layer is in training mode
        return item

    def forward(impl, item):
        if impl == "fastpeft" and p:
            return lora_linear(item["x"], item["w"], None, item["a"], item["b"], SCALE, dropout_p=p)
        return lora.forward(impl, item, SCALE, lora_linear)

    fwd, grads = strategy_hooks(check, forward, lora.grad_inputs)
    rows = time_case(
        without_check(run) if p else run, K, N, M, r, make_item=make_item,
        reference=lambda item: lora.reference_outputs(item, SCALE, ref_dtype), forward=fwd, grad_inputs=grads,
        cost=lambda mode, impl: (lora.lora_flops(M, K, N, r, mode, impl),
                                 lora.lora_bytes(M, K, N, r, mode, impl, run.elem)))
    return with_case(rows, dropout=p)


def dora_case(check: Check, run, K: int, N: int, M: int, r: int) -> list[Row]:
    """One DoRA case (fastpeft/bench/dora.py): ‖W_n‖² cached outside the timed call, as fastpeft's module does."""
    import fastpeft.ops as ops

    fwd, grads = strategy_hooks(check, functools.partial(dora.forward, scale=SCALE, ops=ops), dora.grad_inputs)
    rows = time_case(
        run, K, N, M, r,
        make_item=lambda: dora.make_item(M, K, N, r, check.dtype, check.device, need_dy=True, sq_norm=True,
                                         peft_linear=run.peft),
        reference=lambda item: dora.reference_outputs(item, SCALE), forward=fwd, grad_inputs=grads,
        cost=lambda mode, impl: (dora.dora_flops(M, K, N, r, mode, impl),
                                 dora.dora_bytes(M, K, N, r, mode, impl, run.elem)))
    return with_case(rows, dropout=0.0)


def ia3_case(check: Check, run, K: int, N: int, M: int, kind: str) -> list[Row]:
    """One IA3 case (fastpeft/bench/ia3.py): kind "out" scales the output columns, "in" the input features."""
    from fastpeft.ops import ia3_linear

    fwd, grads = strategy_hooks(check, functools.partial(ia3.forward, ia3=kind, ia3_linear=ia3_linear),
                                ia3.grad_inputs)
    return time_case(
        run, K, N, M, kind,
        make_item=lambda: ia3.make_item(M, K, N, kind, check.dtype, check.device, need_dy=True,
                                        peft_linear=run.peft),
        reference=lambda item: ia3.reference_outputs(item, kind), forward=fwd, grad_inputs=grads,
        cost=lambda mode, impl: (ia3.ia3_flops(M, K, N, kind, mode, impl),
                                 ia3.ia3_bytes(M, K, N, kind, mode, impl, run.elem)))


def section_columns(axis: str, dropout: bool) -> list[Column]:
    cols = columns(SectionFamily("", axis))
    return cols[:3] + [Column("dropout", "p", 4, ".2f")] + cols[3:] if dropout else cols


def _config(plan_part: dict, impls: list[str], peft: str) -> dict:
    return {**plan_part, "impls": impls, "peft": peft, "alpha": "2r", "bias": False,
            "strategies": {s: f"use_kernel_options(linear_strategy={s!r})" for s in STRATEGIES}}


def run_lora(check: Check) -> None:
    plan = check.plan.lora
    impls, peft = peft_impls(check, "peft.tuners.lora.layer")
    run = check.run_for("lora", impls, axis="r", peft=peft)
    cases = [(K, N, M, r, p) for r, p in plan["blocks"] for M in plan["m"] for K, N in plan["shapes"]]
    check.run_cases("lora", _config(plan, impls, "peft.tuners.lora.layer.Linear"), cases,
                    lambda c: lora_case(check, run, *c), lambda c: "K={} N={} M={} r={} p={}".format(*c),
                    section_columns("r", True))


def run_dora(check: Check) -> None:
    plan = check.plan.dora
    impls, peft = peft_impls(check, "peft.tuners.lora.layer", dora.with_dora)
    run = check.run_for("dora", impls, axis="r", peft=peft)
    cases = [(K, N, M, r) for r in plan["ranks"] for M in plan["m"] for K, N in plan["shapes"]]
    check.run_cases("dora", _config(plan, impls, "peft.tuners.lora.layer.Linear(use_dora=True)"), cases,
                    lambda c: dora_case(check, run, *c), lambda c: "K={} N={} M={} r={}".format(*c),
                    section_columns("r", False))


def run_ia3(check: Check) -> None:
    plan = check.plan.ia3
    impls, peft = peft_impls(check, "peft.tuners.ia3.layer")
    run = check.run_for("ia3", impls, axis="ia3", peft=peft)
    cases = [(K, N, M, kind) for M in plan["m"] for K, N, kind in plan["cases"]]
    check.run_cases("ia3", _config(plan, impls, "peft.tuners.ia3.layer.Linear"), cases,
                    lambda c: ia3_case(check, run, *c), lambda c: "K={} N={} M={} ia3={}".format(*c),
                    section_columns("ia3", False))
