"""The multi-adapter op section's targets, in payload["summary"] (n/a on CPU).

Targets (CUDA; decode, 64 distinct rank-16 adapters in a batch of 64, on 4096x4096 and on the Llama-7B block
4 x 4096x4096 + 2 x 4096x11008 + 11008x4096, i.e. the three shapes weighted 4:2:1): fastpeft <= 1.3x base;
>= 10x faster than peft; adapter term >= 70% of the copy bandwidth, where
adapter_bw_pct (an ESTIMATE; fastpeft* rows at decode) = e·(Σ_{a in U} r_a·(K + N) + M·K + 2·M·N)
    / (ms - ms(base)) / measured copy bandwidth: the adapter term alone (read A, B, x; read and write y) as % of
    the device-to-device copy bandwidth.
Beside them, the decode kernel choice: in how many decode cases a forced fastpeft kernel beat the default.
"""
from __future__ import annotations

from .cases import adapter_term_bytes
from .impls import FAST_IMPLS

TARGETS = {"ratio_to_base": 1.3, "speedup_over_peft": 10.0, "adapter_bw_pct": 70.0}
BLOCK_WEIGHTS = {"square": 4, "up": 2, "down": 1}  # q, k, v, o; gate, up; down


def block_shapes(shapes: list[tuple[int, int]]) -> dict | None:
    """{"square": (h, h), "up": (h, I), "down": (I, h)} from the first square shape and its partners, or None."""
    for K, N in shapes:
        if K == N:
            for K2, N2 in shapes:
                if K2 == K and N2 != K and (N2, K) in shapes:
                    return {"square": (K, K), "up": (K, N2), "down": (N2, K)}
            return {"square": (K, K)}
    return None


def summary(flat: list[dict], preset: dict, shapes, cuda: bool, bandwidth_gbps: float | None, elem: int) -> dict:
    """The targets of the module docstring on the target case (decode, uniform, n = B distinct), and the decode
    kernel choice: in how many decode cases a forced fastpeft kernel beat the default."""
    t = preset["target"]
    block = block_shapes(shapes) or {}

    def pick(impl, shape):
        for r in flat:
            if (r["impl"] == impl and r["mode"] == "decode" and r["scenario"] == "uniform" and r["rank"] == t["rank"]
                    and r["B"] == t["B"] and r["n"] == t["n"] and (r["K"], r["N"]) == shape and r.get("ms")):
                return r
        return None

    def value(kind, parts):
        """kind over the weighted parts [(weight, shape)]: None when a row is missing."""
        rows = [(wt, pick("fastpeft", s), pick("base", s), pick("peft", s)) for wt, s in parts]
        if any(f is None or b is None for _, f, b, _ in rows):
            return None
        fast, base = sum(wt * f["ms"] for wt, f, _, _ in rows), sum(wt * b["ms"] for wt, _, b, _ in rows)
        if kind == "ratio_to_base":
            return fast / base
        if kind == "speedup_over_peft":
            return None if any(p is None for *_, p in rows) else sum(wt * p["ms"] for wt, *_, p in rows) / fast
        term = sum(wt * adapter_term_bytes(f["M"], f["K"], f["N"], f["distinct"] * int(t["rank"]), elem)
                   for wt, f, _, _ in rows)
        return None if fast <= base or not bandwidth_gbps else 100.0 * term / ((fast - base) * 1e-3) / (
            bandwidth_gbps * 1e9)

    targets = []
    scopes = []
    if "square" in block:
        scopes.append(("{}x{}".format(*block["square"]), [(1, block["square"])]))
    if len(block) == 3:
        scopes.append((f"Llama block {block['square'][0]}/{block['up'][1]} (shapes 4:2:1)",
                       [(BLOCK_WEIGHTS[k], block[k]) for k in ("square", "up", "down")]))
    for kind, op in (("ratio_to_base", "<="), ("speedup_over_peft", ">="), ("adapter_bw_pct", ">=")):
        for scope, parts in scopes:
            v = value(kind, parts)
            threshold = TARGETS[kind]
            met = None if v is None or not cuda else (v <= threshold if op == "<=" else v >= threshold)
            targets.append({"target": kind, "scope": scope, "value": v, "op": op, "threshold": threshold, "met": met})
    cases = {}
    for r in flat:
        if r["mode"] == "decode" and r["impl"] in FAST_IMPLS and r.get("ms"):
            k = (r["shape"], r["B"], r["scenario"], r["n"], r["rank"])
            cases.setdefault(k, []).append(r)
    beaten = []
    for k, rs in cases.items():
        best = min(rs, key=lambda r: r["ms"])
        default = next((r for r in rs if r["impl"] == "fastpeft"), None)
        if default is not None and best is not default and default["ms"] / best["ms"] > 1.05:
            beaten.append({"shape": k[0], "B": k[1], "scenario": k[2], "n": k[3], "rank": k[4], "best": best["impl"],
                           "speedup_over_default": default["ms"] / best["ms"]})
    return {"applicable": cuda, "case": {"phase": "decode", "scenario": "uniform", **t}, "targets": targets,
            "decode_kernels": {"cases": len(cases), "default_within_5pct_of_best": len(cases) - len(beaten),
                               "beaten": beaten}}


def print_summary(s: dict, device_type: str) -> None:
    c = s["case"]
    print(f"\ntargets (decode, {c['n']} distinct rank-{c['rank']} adapters, B = {c['B']}):")
    if not s["targets"]:
        print("  not measured: no square shape (K = N) in this run")
    for t in s["targets"]:
        label = {"ratio_to_base": "fastpeft time / base time", "speedup_over_peft": "fastpeft speed-up over peft",
                 "adapter_bw_pct": "adapter term % of copy bandwidth (estimate)"}[t["target"]]
        head = f"  target {label} {t['op']} {t['threshold']:g}, {t['scope']}:"
        if not s["applicable"]:
            print(f"{head} not applicable on {device_type} (the targets are for CUDA GPUs; the CPU runs the PyTorch "
                  "reference)")
        elif t["value"] is None:
            print(f"{head} not measured (case missing or no time above the base)")
        else:
            print(f"{head} {t['value']:.2f} -> {'met' if t['met'] else 'NOT met'}")
    d = s["decode_kernels"]
    if s["applicable"] and d["cases"]:
        print(f"  decode kernels: the default is within 5% of the best fastpeft kernel in "
              f"{d['default_within_5pct_of_best']}/{d['cases']} cases")
        for b in d["beaten"][:12]:
            print(f"    {b['shape']} B={b['B']} {b['scenario']} n={b['n']} r={b['rank']}: {b['best']} "
                  f"{b['speedup_over_default']:.2f}x faster than the default")
    elif d["cases"]:
        print(f"  decode kernel choice: not applicable on {device_type}")
