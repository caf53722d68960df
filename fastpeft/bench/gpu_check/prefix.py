"""The prefix-attention section: O = softmax(Q [P_K; K]ᵀ / sqrt(D) + mask) [P_V; V] (a learned prefix of P keys
and values that every query sees, causal over the L real keys) against SDPA on the same L without the prefix (the
floor; the goal is (L + P) / L x the floor) and the concatenate-then-SDPA way of PEFT-style code, in training
forward, forward+backward and decode, through fastpeft/bench/prefix_attention's case function (its docstring: the
cost model, the float64 check on a slice). Llama-7B attention: 32 heads of 128, B = 16384 // L.
"""
from __future__ import annotations

from ..prefix_attention import op
from .context import Check

DIMS = ("tokens", "heads", "kv_heads", "head_dim")


def run_prefix(check: Check) -> None:
    plan = check.plan.prefix
    dims = {k: plan[k] for k in DIMS}
    floor_ctx, floor_backend = op.floor_context(check.device, check.dtype)
    run = check.run_for("prefix_attention", op.IMPLS, ctx={"dims": dims, "floor_ctx": floor_ctx}, check_heads=4)
    config = {**plan, "impls": list(op.IMPLS), "floor_backend": floor_backend, "batch": "tokens // L",
              "target": "ms(fastpeft, L, P) / ms(floor, L) <= (L + P) / L",
              "strategies": "none: attention has no linear strategy"}
    cases = [(L, P, mode) for mode in plan["modes"] for L in plan["lengths"] for P in plan["prefix_lengths"]]
    entry = check.run_cases("prefix_attention", config, cases, lambda c: op.run_case(run, *c),
                            lambda c: "L={} P={} {}".format(*c), op.columns())
    entry["summary"] = op.summary(entry["rows"])
    check.write()
