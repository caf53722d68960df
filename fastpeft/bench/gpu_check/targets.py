"""Issue 15's targets, computed from the rows (recorded, never asserted), and the strategy table chosen from them.

Targets, each for fused, cublas and "best" (per case the faster of the two: what the strategy table can reach;
multi-LoRA: fastpeft, fastpeft_cuda, best), worst case over the scope:
    lora_fwd        LoRA forward / base (F.linear on cuBLAS) <= 1.05 at M >= 4096 (every shape, rank, dropout)
    lora_fwd_bwd    LoRA forward+backward / base <= 1.10 at M >= 4096
    lora_vs_peft    PEFT time / fastpeft time >= 1.0 at every point of the LoRA grid (both modes)
    dora_vs_lora    DoRA forward+backward / fastpeft LoRA forward+backward (same shape, M, r; dropout 0) <= 1.10
    multi_decode    multi-LoRA decode, 64 distinct rank-16 adapters / the base layer <= 1.05 (every shape)
    nf4_train       NF4 LoRA forward+backward / bf16 LoRA (the same layer on the dequantized W) <= 1.05, M >= 4096
    nf4_decode      NF4 LoRA forward / bf16 LoRA <= 1.0 at M <= 16 (4x fewer weight bytes: faster)
    serve_64_adapters  serving engine tokens/s with 64 rank-16 adapters / with none >= 0.9 (saturation, uniform and
                    Zipf popularity; issue 17); the engine has one path, its value is the "best" variant
    moe_vs_base     fastpeft's LoRA on MoE expert tensors, forward+backward of the experts module / the module without
                    adapter <= 1.15 (every layer of the moe section: Mixtral- and Qwen3-MoE-shaped); one path: "best"
    moe_vs_peft     PEFT's target_parameters time / fastpeft's, forward+backward >= 2 (PEFT materialises W + ΔW)
"met" is None off CUDA (the targets are for GPUs) and where nothing was measured.
"""
from __future__ import annotations

from .context import STRATEGIES

TARGETS = (  # id, section, what, op, threshold
    ("lora_fwd", "lora", "LoRA forward / cuBLAS base GEMM, M >= 4096", "<=", 1.05),
    ("lora_fwd_bwd", "lora", "LoRA forward+backward / cuBLAS base, M >= 4096", "<=", 1.10),
    ("lora_vs_peft", "lora", "PEFT time / fastpeft time, every LoRA grid point", ">=", 1.0),
    ("dora_vs_lora", "dora", "DoRA forward+backward / fastpeft LoRA forward+backward", "<=", 1.10),
    ("multi_decode", "multi_lora", "multi-LoRA decode, 64 distinct rank-16 adapters / base layer", "<=", 1.05),
    ("nf4_train", "lora_4bit", "NF4 LoRA forward+backward / bf16 LoRA, M >= 4096", "<=", 1.05),
    ("nf4_decode", "lora_4bit", "NF4 LoRA forward / bf16 LoRA, M <= 16", "<=", 1.0),
    ("serve_64_adapters", "serve", "serving tokens/s, 64 rank-16 adapters / no adapter (saturation)", ">=", 0.9),
    ("moe_vs_base", "moe", "MoE expert LoRA forward+backward / the experts module without adapter", "<=", 1.15),
    ("moe_vs_peft", "moe", "PEFT target_parameters time / fastpeft time, MoE experts forward+backward", ">=", 2.0),
)
MARGIN = 0.01  # the strategy table keeps the default unless the other strategy is more than 1% faster
RULE = ("for each op and row bucket: the strategy with the smaller sum of forward+backward median times over the "
        "cases gpu-check measured at that bucket's M with both strategies (every shape, rank, dropout and IA3 mode "
        f"of the run); the default unless the other is more than {MARGIN:.0%} faster")
OPS = {"lora": "lora_linear", "dora": "dora_linear", "ia3": "ia3_linear", "lora_4bit": "lora_linear_4bit"}


def _times(rows: list[dict], mode: str, keys: tuple[str, ...]) -> dict[tuple, dict[str, float]]:
    """{case key: {impl: ms}} of one mode's timed rows."""
    out: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r["mode"] == mode and r.get("ms"):
            out.setdefault(tuple(r.get(k) for k in keys), {})[r["impl"]] = r["ms"]
    return out


def _with_best(times: dict[str, float], fast: tuple[str, ...]) -> dict[str, float]:
    """times plus "best": the fastest of the fast impls that ran."""
    measured = [times[i] for i in fast if i in times]
    return {**times, "best": min(measured)} if measured else times


def _evaluate(points: dict[tuple, dict[str, float]], variants, op: str, threshold: float, keys, applicable: bool):
    """Per variant: the worst value over the points, how many points meet the threshold, the worst point."""
    out = {}
    for variant in variants:
        values = {k: v[variant] for k, v in points.items() if variant in v}
        if not values:
            out[variant] = {"value": None, "met": None, "points": 0}
            continue
        worst_key = max(values, key=values.get) if op == "<=" else min(values, key=values.get)
        meets = [v <= threshold if op == "<=" else v >= threshold for v in values.values()]
        out[variant] = {"value": values[worst_key], "met": all(meets) if applicable else None,
                        "points": len(values), "points_met": sum(meets), "worst": dict(zip(keys, worst_key))}
    return out


def compute(sections: dict, applicable: bool) -> list[dict]:
    """Every target of the module docstring from the sections' rows."""
    lora_keys = ("shape", "M", "r", "dropout")
    lora = sections.get("lora", {}).get("rows", [])
    values: dict[str, tuple] = {}
    for tid, mode in (("lora_fwd", "fwd"), ("lora_fwd_bwd", "fwd+bwd")):
        points = {}
        for k, t in _times(lora, mode, lora_keys).items():
            if k[1] >= 4096 and t.get("base"):
                points[k] = {i: ms / t["base"] for i, ms in _with_best(t, STRATEGIES).items() if i != "base"}
        values[tid] = (points, lora_keys + ("mode",))
    points = {}
    for mode in ("fwd", "fwd+bwd"):
        for k, t in _times(lora, mode, lora_keys).items():
            if t.get("peft"):
                points[k + (mode,)] = {i: t["peft"] / ms for i, ms in _with_best(t, STRATEGIES).items()
                                       if i not in ("base", "peft")}
    values["lora_vs_peft"] = (points, lora_keys + ("mode",))
    dora_keys = ("shape", "M", "r")
    lora_p0 = {k[:3]: _with_best(t, STRATEGIES) for k, t in _times(lora, "fwd+bwd", lora_keys).items() if k[3] == 0}
    points = {}
    for k, t in _times(sections.get("dora", {}).get("rows", []), "fwd+bwd", dora_keys).items():
        ref = lora_p0.get(k, {})
        points[k] = {i: ms / ref[i] for i, ms in _with_best(t, STRATEGIES).items() if i in ref and i != "base"}
    values["dora_vs_lora"] = (points, dora_keys)
    multi_fast = ("fastpeft", "fastpeft_cuda")
    points = {}
    for k, t in _times(sections.get("multi_lora", {}).get("rows", []), "decode", ("shape", "B", "n")).items():
        if t.get("base"):
            points[k] = {i: ms / t["base"] for i, ms in _with_best(t, multi_fast).items() if i != "base"}
    values["multi_decode"] = (points, ("shape", "B", "n"))
    nf4 = sections.get("lora_4bit", {}).get("rows", [])
    for tid, mode, rows_in in (("nf4_train", "fwd+bwd", lambda m: m >= 4096), ("nf4_decode", "fwd", lambda m: m <= 16)):
        points = {}
        for k, t in _times(nf4, mode, ("shape", "M", "r")).items():
            if rows_in(k[1]) and t.get("bf16_lora"):
                points[k] = {i: ms / t["bf16_lora"] for i, ms in _with_best(t, STRATEGIES).items()
                             if i in (*STRATEGIES, "best")}
        values[tid] = (points, ("shape", "M", "r"))
    points = {(r["impl"], r["mode"]): {"best": r["vs_no_adapters"]} for r in sections.get("serve", {}).get("rows", [])
              if r.get("adapters") == 64 and r["mode"] == "saturation" and r.get("vs_no_adapters") is not None}
    values["serve_64_adapters"] = (points, ("popularity", "mode"))
    moe_times = _times(sections.get("moe", {}).get("rows", []), "fwd+bwd", ("layer",))
    values["moe_vs_base"] = ({k: {"best": t["fastpeft"] / t["base"]} for k, t in moe_times.items()
                              if t.get("fastpeft") and t.get("base")}, ("layer",))
    values["moe_vs_peft"] = ({k: {"best": t["peft"] / t["fastpeft"]} for k, t in moe_times.items()
                              if t.get("fastpeft") and t.get("peft")}, ("layer",))
    out = []
    for tid, section, what, op, threshold in TARGETS:
        variants = (*multi_fast, "best") if tid == "multi_decode" else (*STRATEGIES, "best")
        variants = ("best",) if tid in ("serve_64_adapters", "moe_vs_base", "moe_vs_peft") else variants
        points, keys = values[tid]
        per = _evaluate(points, variants, op, threshold, keys, applicable)
        out.append({"target": tid, "section": section, "what": what, "op": op, "threshold": threshold,
                    "variants": per, "met": per["best"]["met"]})
    return out


def choose_strategies(sections: dict, default: str, bucket_of=lambda m: m) -> dict:
    """{op: {row bucket: {"choice", per-strategy total ms, "cases"}}} by RULE from the fwd+bwd rows; bucket_of(M)
    is the row bucket of a case (strategy.row_bucket)."""
    table = {}
    for section, op in OPS.items():
        rows = sections.get(section, {}).get("rows", [])
        keys = tuple(k for k in ("shape", "M", "r", "dropout", "ia3") if any(k in r for r in rows))
        by_bucket: dict[int, list[dict]] = {}
        for k, t in _times(rows, "fwd+bwd", keys).items():
            if all(s in t for s in STRATEGIES):
                by_bucket.setdefault(bucket_of(k[keys.index("M")]), []).append(t)
        for bucket, cases in sorted(by_bucket.items()):
            totals = {s: sum(t[s] for t in cases) for s in STRATEGIES}
            faster = min(totals, key=totals.get)
            choice = faster if totals[faster] < (1.0 - MARGIN) * totals[default] else default
            table.setdefault(op, {})[bucket] = {"choice": choice, "total_ms": totals, "cases": len(cases)}
    return table
