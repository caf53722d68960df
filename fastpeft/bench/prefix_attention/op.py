"""The prefix-attention op section (--modes fwd,fwdbwd,decode): attention of q (B, H, Lq, D) over a learned prefix
P_K, P_V (1, H_kv, P, D), shared by the batch, and the real keys K, V (B, H_kv, L, D) (Li & Liang 2021):
O = softmax(Q [P_K; K]ᵀ / sqrt(D) + mask) [P_V; V]; every query sees the whole prefix, the mask (causal) applies to
the real keys only. A case is (L, P) with B = tokens // L (--tokens, default 16384: B·L tokens per call), H query
heads, H_kv key/value heads, head dim D.
Modes:
    fwd       training forward, Lq = L, causal, under torch.no_grad
    fwd+bwd   training forward + backward: torch.autograd.grad of a fixed dO with respect to q, k, v and the
              prefix (prefix tuning freezes the base model, but the activations q, k, v still need gradients so
              that earlier layers' prefixes learn; this is the case that matters)
    decode    one new token: Lq = 1 against a KV cache of length L (not causal: the query sees the whole cache and
              the prefix), under torch.no_grad
Implementations, timed side by side on the same inputs:
    floor     torch.nn.functional.scaled_dot_product_attention on the same q, k, v WITHOUT the prefix (is_causal in
              fwd/fwd+bwd); on CUDA with fp16/bf16 forced to the flash backend (torch.nn.attention.sdpa_kernel)
    fastpeft  fastpeft.ops.prefix_attention(q, k, v, prefix_k, prefix_v, causal=...): the prefix is read from its
              own tensors, never concatenated
    torch     what PEFT-style code does: torch.cat([prefix.expand(B, ...), K]) (and V), then SDPA with an explicit
              boolean mask (L, P + L): prefix columns all True, the real keys causal (decode: no mask; the
              concatenation happens on every call; PEFT itself keeps the prefix inside its KV cache)
Columns: "x floor" = ms / ms(floor); "target" = (L + P) / L, the goal fastpeft(L, P) <= (L + P) / L · floor(L):
attending over P more keys should cost no more than their share; "met" says whether the row meets it (the goal is
stated for fastpeft in fwd+bwd and decode; it is printed for every row). "vs torch" = ms(torch) / ms.

FLOPs (FlashAttention's count, useful work only; GQA does not change it): per query row and key 4D (QKᵀ, PV),
    forward   4·B·H·Lq·(P + L)·D, causal training: 4·B·H·D·(L·P + L²/2) (the real part halves)
    backward  2.5 x forward;  fwd+bwd = 3.5 x forward;  the floor: the same with P = 0
Bytes (minimum traffic, e bytes per element, each operand read once and each result written once):
    forward   e·(2·B·H·Lq·D + 2·B·H_kv·L·D + 2·H_kv·P·D)             read q, K, V, the prefix; write O
    backward  e·(4·B·H·Lq·D + 4·B·H_kv·L·D + 4·H_kv·P·D)             read q, O, dO, K, V, prefix;
                                                                     write dq, dK, dV, dprefix (LSE, Δ left out)
    decode    the forward with Lq = 1: reading the KV cache dominates (memory bound)
% of roofline = 100 · max(flops / peak matmul, bytes / peak bandwidth) / time, with the peaks measured in the run
(fastpeft/bench/roofline.py measure_peaks). Each row carries rel_err: its outputs (O; and the gradients in fwd+bwd)
against fastpeft.reference.attention.prefix_attention in float64 (the floor: without the prefix), checked once per
case on the first batch row and the first heads (--check-heads) of the first pool item, run by every impl.
Rows in payload["rows"]; per target mode, how many meet the goal in payload["summary"].
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import math

import torch
import torch.nn.functional as F

from ..devices import dtype_name, free_memory
from ..driver import Run, Section, backends
from ..inputs import InputPool
from ..measure import check_and_time
from ..options import add_int_options, positive_ints
from ..report import Column, plot_ratio_to_base, print_pivot
from ..roofline import Row, fill_metrics

IMPLS = ("floor", "fastpeft", "torch")
MODES = ("fwd", "fwd+bwd", "decode")
TARGET_MODES = ("fwd+bwd", "decode")  # where the issue states the (L + P) / L goal
FULL = {"lengths": [512, 1024, 2048, 4096], "prefix_lengths": [10, 30, 100], "tokens": 16384, "heads": 32,
        "kv_heads": 32, "head_dim": 128}  # Llama-7B attention
QUICK = {"lengths": [32, 128], "prefix_lengths": [10, 30], "tokens": 256, "heads": 4, "kv_heads": 4, "head_dim": 64}


# ------------------------------------------------------------------------------------------------------------
# Cost model
# ------------------------------------------------------------------------------------------------------------

def query_length(L: int, mode: str) -> int:
    return 1 if mode == "decode" else L


def attention_flops(B: int, H: int, L: int, P: int, D: int, mode: str, impl: str) -> float:
    """Useful flops of one call (formulas in the module docstring); the floor has no prefix."""
    P = 0 if impl == "floor" else P
    if mode == "decode":
        return float(4 * B * H * (P + L) * D)
    fwd = 4 * B * H * D * (L * P + L * L / 2)
    return float(fwd if mode == "fwd" else 3.5 * fwd)


def attention_bytes(B: int, H: int, Hkv: int, L: int, P: int, D: int, mode: str, impl: str, elem: int) -> float:
    """Minimum memory traffic of one call in bytes (formulas in the module docstring)."""
    P = 0 if impl == "floor" else P
    Lq = query_length(L, mode)
    fwd = elem * (2 * B * H * Lq * D + 2 * B * Hkv * L * D + 2 * Hkv * P * D)
    bwd = elem * (4 * B * H * Lq * D + 4 * B * Hkv * L * D + 4 * Hkv * P * D)
    return float(fwd + bwd if mode == "fwd+bwd" else fwd)


def target_ratio(L: int, P: int) -> float:
    """The goal for time(fastpeft, L, P) / time(floor, L): (L + P) / L."""
    return (L + P) / L


# ------------------------------------------------------------------------------------------------------------
# Implementations
# ------------------------------------------------------------------------------------------------------------

def floor_context(device: torch.device, dtype: torch.dtype):
    """(context manager, backend name) for the floor's SDPA: flash forced on CUDA where it applies."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
        except ImportError:
            return contextlib.nullcontext, "sdpa (default choice: no torch.nn.attention.sdpa_kernel)"
        return (lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])), "sdpa, flash backend forced"
    return contextlib.nullcontext, "sdpa (default choice)"


def make_item(B: int, H: int, Hkv: int, L: int, P: int, D: int, mode: str, dtype, device) -> dict:
    """One set of inputs: q (B, H, Lq, D), K, V (B, H_kv, L, D), a shared prefix (1, H_kv, P, D), all N(0, 1); in
    fwd+bwd a fixed dO ~ N(0, 1); for torch, its (L, P + L) boolean mask (built once, as a model would)."""
    grad = mode == "fwd+bwd"

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)

    Lq = query_length(L, mode)
    item = {"q": randn(B, H, Lq, D), "k": randn(B, Hkv, L, D), "v": randn(B, Hkv, L, D),
            "pk": randn(1, Hkv, P, D), "pv": randn(1, Hkv, P, D), "mode": mode}
    if grad:
        item["dy"] = torch.randn(B, H, Lq, D, device=device, dtype=dtype)
    if mode != "decode":
        mask = torch.ones(L, P + L, dtype=torch.bool, device=device)
        mask[:, P:] = torch.ones(L, L, dtype=torch.bool, device=device).tril()
        item["mask"] = mask
    return item


def forward(impl: str, item: dict, floor_ctx=contextlib.nullcontext) -> torch.Tensor:
    q, k, v, pk, pv = (item[n] for n in ("q", "k", "v", "pk", "pv"))
    causal = item["mode"] != "decode"
    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    if impl == "floor":
        with floor_ctx():
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, **gqa)
    if impl == "fastpeft":
        import fastpeft as fp

        return fp.ops.prefix_attention(q, k, v, pk, pv, causal=causal)
    if impl == "torch":
        B = q.shape[0]
        keys = torch.cat([pk.expand(B, -1, -1, -1), k], dim=2)
        values = torch.cat([pv.expand(B, -1, -1, -1), v], dim=2)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=item.get("mask"), **gqa)
    raise ValueError(f"unknown implementation {impl!r}")


def grad_inputs(impl: str, item: dict) -> list[torch.Tensor]:
    """What fwd+bwd differentiates: q, K, V and the prefix (the floor has no prefix)."""
    names = ("q", "k", "v") if impl == "floor" else ("q", "k", "v", "pk", "pv")
    return [item[n] for n in names]


def check_slice(item: dict, heads: int) -> dict:
    """The first batch row and the first `heads` query heads (with their key/value heads) of an item, as fresh
    leaves: small enough for a float64 reference at any L."""
    H, Hkv = item["q"].shape[1], item["k"].shape[1]
    group = H // Hkv
    hkv = max(1, min(Hkv, math.ceil(heads / group)))
    out = {"mode": item["mode"], "mask": item.get("mask")}
    for name, h in (("q", hkv * group), ("k", hkv), ("v", hkv), ("pk", hkv), ("pv", hkv), ("dy", hkv * group)):
        if name in item:
            out[name] = item[name][:1, :h].detach().clone().requires_grad_(item[name].requires_grad)
    return out


def reference_outputs(item: dict) -> dict:
    """fastpeft.reference.attention.prefix_attention in float64: {"prefix": [O, *grads], "floor": [O, *grads]}."""
    from fastpeft.reference.attention import prefix_attention as formula

    causal = item["mode"] != "decode"
    out = {}
    for key, names in (("prefix", ("q", "k", "v", "pk", "pv")), ("floor", ("q", "k", "v"))):
        args = [item[n].detach().double().requires_grad_() for n in names]
        with torch.enable_grad():
            y = formula(*args, causal=causal)
            out[key] = [y.detach()]
            if "dy" in item:
                out[key] += [g.detach() for g in torch.autograd.grad(y, args, item["dy"].double())]
    return out


def run_case(run: Run, L: int, P: int, mode: str) -> list[Row]:
    """Check and time every impl of one (L, P, mode) on one shared input pool."""
    args, device, dtype, dims = run.args, run.device, run.dtype, run.ctx["dims"]
    H, Hkv, D = dims["heads"], dims["kv_heads"], dims["head_dim"]
    B = max(1, dims["tokens"] // L)
    elem = run.elem
    case = {"L": L, "P": P, "B": B, "H": H, "Hkv": Hkv, "D": D, "Lq": query_length(L, mode), "dtype": dtype_name(dtype)}
    floor_ctx = run.ctx["floor_ctx"]
    rows = []

    def new_row(impl, ms=None, note="", err=None, extra=None):
        return Row(run.family.bench, case, mode, impl, ms, attention_flops(B, H, L, P, D, mode, impl),
                   attention_bytes(B, H, Hkv, L, P, D, mode, impl, elem), rel_err=err, note=note, extra=extra or {})

    def step(impl, item):
        y = forward(impl, item, floor_ctx)
        return [y] if mode != "fwd+bwd" else [y, *torch.autograd.grad(y, grad_inputs(impl, item), item["dy"])]

    try:
        pool = InputPool.build(lambda: make_item(B, H, Hkv, L, P, D, mode, dtype, device), device)
    except Exception as exc:  # typically out of memory for the largest cases: record and go on
        free_memory(device)
        note = f"inputs failed: {type(exc).__name__}: {str(exc)[:160]}"
        return [new_row(impl, note=note) for impl in run.impls]
    small = refs = None
    if not args.no_check:
        try:
            small = check_slice(pool.first, args.check_heads)
            refs = reference_outputs(small)
        except Exception as exc:
            print(f"  check skipped for {case} {mode}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
            free_memory(device)
    grad_mode = torch.enable_grad if mode == "fwd+bwd" else torch.no_grad
    for impl in run.impls:
        check = None if refs is None else (small, refs["floor" if impl == "floor" else "prefix"])
        ms, err, note = check_and_time(run, f"{impl} {mode} {case}", lambda item: step(impl, item), check, pool,
                                       grad_mode)
        rows.append(new_row(impl, ms, note, err, {"pool_copies": len(pool)}))
    fill_metrics(rows, run.peaks, base="floor", peer="torch")
    target = target_ratio(L, P)
    for row in rows:
        row.extra["ratio_to_floor"] = row.vs_base
        row.extra["target_ratio"] = target
        row.extra["meets_target"] = None if row.vs_base is None or row.impl == "floor" else row.vs_base <= target
    return rows


def columns() -> list[Column]:
    return [Column("L", "L", 5), Column("P", "P", 4), Column("B", "B", 4), Column("mode", "mode", 7),
            Column("impl", "impl", 8), Column("ms", "ms", 10, ".4f"), Column("vs_base", "x floor", 7, ".3f"),
            Column("target_ratio", "target", 6, ".3f"), Column("meets_target", "met", 5),
            Column("vs_peer", "vs torch", 8, ".2f"), Column("tflops", "TFLOP/s", 8, ".2f"),
            Column("gbps", "GB/s", 8, ".1f"), Column("roofline_pct", "%roof", 6, ".1f"), Column("bound", "bound", 7),
            Column("rel_err", "rel_err", 8, ".1e"), Column("note", "note", 4)]


def summary(flat: list[dict]) -> dict:
    """For each target mode: how many fastpeft rows meet (L + P) / L · floor, and the worst ratio / target."""
    out = {}
    for mode in TARGET_MODES:
        rows = [r for r in flat if r["impl"] == "fastpeft" and r["mode"] == mode and r["meets_target"] is not None]
        if rows:
            worst = max(rows, key=lambda r: r["vs_base"] / r["target_ratio"])
            out[mode] = {"met": sum(bool(r["meets_target"]) for r in rows), "cases": len(rows),
                         "worst": {"L": worst["L"], "P": worst["P"], "ratio_to_floor": worst["vs_base"],
                                   "target_ratio": worst["target_ratio"]}}
    return out


# ------------------------------------------------------------------------------------------------------------
# The section
# ------------------------------------------------------------------------------------------------------------

def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lengths", type=positive_ints, help="sequence lengths L, e.g. 512,4096")
    p.add_argument("--prefix-lengths", type=positive_ints, help="prefix lengths P, e.g. 10,30,100")
    add_int_options(p, {"--tokens": "tokens per call B·L (B = tokens // L; default 16384, quick 256)",
                        "--heads": "query heads H (default 32, quick 4)",
                        "--kv-heads": "key/value heads H_kv (default 32, quick 4)",
                        "--head-dim": "head dim D (default 128, quick 64)"})
    p.add_argument("--check-heads", type=int, default=4, help="query heads in the float64 check (default 4)")


def prepare(run: Run) -> tuple[str, dict]:
    """The op section's sizes, modes and impls (fastpeft dropped with a note where it does not import) and the
    floor's SDPA backend -> the banner line, and the JSON's "config" (with the "model" rows' and "summary" places)."""
    args = run.args
    preset = QUICK if run.quick else FULL
    lengths, prefixes = args.lengths or preset["lengths"], args.prefix_lengths or preset["prefix_lengths"]
    dims = {k: getattr(args, k) or preset[k] for k in ("tokens", "heads", "kv_heads", "head_dim")}
    if dims["heads"] % dims["kv_heads"]:
        raise SystemExit(f"--heads {dims['heads']} must be a multiple of --kv-heads {dims['kv_heads']}")
    run.impls = [i for i in run.impls if i in IMPLS]
    if "fastpeft" in run.impls:
        try:
            importlib.import_module("fastpeft.ops")
        except Exception as exc:
            run.note(f"fastpeft skipped: {type(exc).__name__}: {exc}")
            run.impls.remove("fastpeft")
    floor_ctx, floor_backend = floor_context(run.device, run.dtype)
    modes = [m for m in args.modes if m in MODES]
    run.ctx.update(lengths=lengths, prefixes=prefixes, dims=dims, modes=modes, floor_ctx=floor_ctx)
    banner = (f"L {lengths}; P {prefixes}; B = {dims['tokens']} // L; H {dims['heads']}, H_kv {dims['kv_heads']}, "
              f"D {dims['head_dim']}; modes {modes}; impls {run.impls}; floor: {floor_backend}")
    config = {"lengths": lengths, "prefix_lengths": prefixes, **dims, "batch": "tokens // L",
              "prefix": "shared (1, H_kv, P, D)", "modes": modes, "impls": run.impls, "floor_backend": floor_backend,
              "target": "ms(fastpeft, L, P) / ms(floor, L) <= (L + P) / L", "target_modes": list(TARGET_MODES),
              "check_slice": f"batch row 0, {args.check_heads} query heads, float64 reference"}
    return banner, {"config": config,
                    "fastpeft_backends": backends(run.device) if "fastpeft" in run.impls else {},
                    "model": [], "summary": {}}


def run_op(run: Run) -> None:
    """Every (mode, L, P), recorded as it finishes; then the target summary."""
    table = run.table(columns())
    for mode in run.ctx["modes"]:
        for L in run.ctx["lengths"]:
            for P in run.ctx["prefixes"]:
                run.record("rows", run_case(run, L, P, mode), table)
    run.payload["summary"] = summary(run.payload["rows"])
    run.write()


def report_op(run: Run) -> None:
    """The pivots of the fastpeft rows and the target summary."""
    fast = [r for r in run.payload["rows"] if r["impl"] == "fastpeft"]
    pivots = [("vs_base", "fastpeft time / floor time (SDPA on L without prefix), by L; target (L + P) / L:", ".3f"),
              ("target_ratio", "target (L + P) / L, by L:", ".3f"),
              ("vs_peer", "fastpeft speed-up over concatenate + SDPA (torch ms / fastpeft ms), by L:", ".2f")]
    for key, title, fmt in pivots:
        if fast and any(r.get(key) is not None for r in fast):
            print()
            print_pivot(fast, row_keys=("mode", "P"), col_key="L", value_key=key, title=title, fmt=fmt)
    for mode, s in run.payload.get("summary", {}).items():
        w = s["worst"]
        print(f"target {mode}: fastpeft meets (L + P) / L x floor in {s['met']}/{s['cases']} cases; worst L={w['L']} "
              f"P={w['P']}: {w['ratio_to_floor']:.3f} vs {w['target_ratio']:.3f}")


def plot(run: Run):
    title = f"Prefix attention vs SDPA without prefix: {run.payload['device']['name']}, {dtype_name(run.dtype)}"
    return plot_ratio_to_base(run.payload["rows"], run.json_path.with_suffix(".png"), title=title, panel_key="P",
                              x_key="L", base="floor")


SECTION = Section(modes=MODES, run=run_op, report=report_op, options=options)
