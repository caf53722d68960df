"""Prefix-attention microbenchmark: torch SDPA without a prefix (the floor), fastpeft's prefix_attention and the
plain-PyTorch way (concatenate the prefix, SDPA with an explicit mask), in training and in decode.

    python benchmarks/prefix_attention.py           # CUDA: Llama-7B attention, bf16, L 512..4096, P 10/30/100
    python benchmarks/prefix_attention.py --quick   # tiny fp32 cases, D 64 (the default without CUDA)
    python benchmarks/prefix_attention.py --lengths 2048 --prefix-lengths 30 --modes fwdbwd,decode
    fastpeft bench prefix --quick                   # the same through the command line tool

Attention of q (B, H, Lq, D) over a learned prefix P_K, P_V (1, H_kv, P, D), shared by the batch, and the real
keys K, V (B, H_kv, L, D) (Li & Liang 2021):  O = softmax(Q [P_K; K]ᵀ / sqrt(D) + mask) [P_V; V]; every query
sees the whole prefix, the mask (causal) applies to the real keys only. A case is (L, P) with B = tokens // L
(--tokens, default 16384: B·L tokens per call), H query heads, H_kv key/value heads, head dim D.
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
(benchmarks/common.py measure_peaks). Each row carries rel_err: its outputs (O; and the gradients in fwd+bwd)
against fastpeft.reference.attention.prefix_attention in float64 (the floor: without the prefix), checked once per
case on the first batch row and the first heads (--check-heads) of the first pool item, run by every impl.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

try:  # imported as benchmarks.prefix_attention (repo root on sys.path)
    from . import _driver
    from .common import (RESULTS_DIR, Column, InputPool, Row, TablePrinter, dtype_name, environment, fill_metrics,
                         free_memory, is_oom, measure_peaks, parse_dtype, pick_device, plot_ratio_to_base,
                         print_pivot, result_path, str_list, time_ms, write_json)
except ImportError:  # run as a script: python benchmarks/prefix_attention.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import _driver
    from benchmarks.common import (RESULTS_DIR, Column, InputPool, Row, TablePrinter, dtype_name, environment,
                                   fill_metrics, free_memory, is_oom, measure_peaks, parse_dtype,
                                   pick_device, plot_ratio_to_base, print_pivot, result_path, str_list, time_ms,
                                   write_json)

BENCH = "prefix_attention"
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


# ------------------------------------------------------------------------------------------------------------
# One case
# ------------------------------------------------------------------------------------------------------------

def run_case(ctx: dict, L: int, P: int, mode: str) -> list[Row]:
    """Check and time every impl of one (L, P, mode) on one shared input pool."""
    args, device, dtype, dims = ctx["args"], ctx["device"], ctx["dtype"], ctx["dims"]
    H, Hkv, D = dims["heads"], dims["kv_heads"], dims["head_dim"]
    B = max(1, dims["tokens"] // L)
    elem = torch.empty((), dtype=dtype).element_size()
    case = {"L": L, "P": P, "B": B, "H": H, "Hkv": Hkv, "D": D, "Lq": query_length(L, mode), "dtype": dtype_name(dtype)}
    tolerance = _driver.TOLERANCE.get(dtype, 1e-2)
    floor_ctx = ctx["floor_ctx"]
    rows = []

    def new_row(impl, ms=None, note="", err=None, extra=None):
        return Row(BENCH, case, mode, impl, ms, attention_flops(B, H, L, P, D, mode, impl),
                   attention_bytes(B, H, Hkv, L, P, D, mode, impl, elem), rel_err=err, note=note, extra=extra or {})

    def step(impl, item):
        y = forward(impl, item, floor_ctx)
        return [y] if mode != "fwd+bwd" else [y, *torch.autograd.grad(y, grad_inputs(impl, item), item["dy"])]

    try:
        pool = InputPool.build(lambda: make_item(B, H, Hkv, L, P, D, mode, dtype, device), device)
    except Exception as exc:  # typically out of memory for the largest cases: record and go on
        free_memory(device)
        note = f"inputs failed: {type(exc).__name__}: {str(exc)[:160]}"
        return [new_row(impl, note=note) for impl in ctx["impls"]]
    small = refs = None
    if not args.no_check:
        try:
            small = check_slice(pool.first, args.check_heads)
            refs = reference_outputs(small)
        except Exception as exc:
            print(f"  check skipped for {case} {mode}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
            free_memory(device)
    grad_mode = torch.enable_grad if mode == "fwd+bwd" else torch.no_grad
    for impl in ctx["impls"]:
        err, note = None, ""
        try:
            with grad_mode():
                if refs is not None:
                    err = _driver.max_rel_err(step(impl, small), refs["floor" if impl == "floor" else "prefix"])
                    if not err <= tolerance:  # also true for nan
                        note = "MISMATCH"
                        print(f"  WARNING: {impl} {mode} {case}: rel_err {err:.2e} exceeds {tolerance}", flush=True)
                ms = time_ms(lambda: step(impl, pool.next()), device, ctx["timer"])
        except Exception as exc:
            ms = None
            note = ("OOM" if is_oom(exc) else "error") + f": {type(exc).__name__}: {str(exc)[:160]}"
            print(f"  {impl} {mode} {case}: {note}", flush=True)
            free_memory(device)
        rows.append(new_row(impl, ms, note, err, {"pool_copies": len(pool)}))
    fill_metrics(rows, ctx["peaks"], base="floor", peer="torch")
    target = target_ratio(L, P)
    for row in rows:
        row.extra["ratio_to_floor"] = row.vs_base
        row.extra["target_ratio"] = target
        row.extra["meets_target"] = None if row.vs_base is None or row.impl == "floor" else row.vs_base <= target
    return rows


# ------------------------------------------------------------------------------------------------------------
# Command line and run
# ------------------------------------------------------------------------------------------------------------

def parse_modes(text: str) -> list[str]:
    names = {"fwd": "fwd", "forward": "fwd", "fwdbwd": "fwd+bwd", "fwd+bwd": "fwd+bwd", "train": "fwd+bwd",
             "decode": "decode"}
    modes = []
    for m in str_list(text):
        if m.lower() not in names:
            raise argparse.ArgumentTypeError(f"unknown mode {m!r}; use fwd, fwdbwd and/or decode")
        modes.append(names[m.lower()])
    return list(dict.fromkeys(modes))


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"benchmarks/{BENCH}.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=None,
                   help="tiny fp32-friendly cases, fewer repetitions (default: on without CUDA, off with it)")
    p.add_argument("--lengths", type=_driver.positive_ints, help="sequence lengths L, e.g. 512,4096")
    p.add_argument("--prefix-lengths", type=_driver.positive_ints, help="prefix lengths P, e.g. 10,30,100")
    p.add_argument("--tokens", type=int, help="tokens per call B·L (B = tokens // L; default 16384, quick 256)")
    p.add_argument("--heads", type=int, help="query heads H (default 32, quick 4)")
    p.add_argument("--kv-heads", type=int, help="key/value heads H_kv (default 32, quick 4)")
    p.add_argument("--head-dim", type=int, help="head dim D (default 128, quick 64)")
    p.add_argument("--dtype", help="bf16, fp16 or fp32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--modes", type=parse_modes, default=list(MODES), help="fwd,fwdbwd,decode (default: all)")
    p.add_argument("--impls", type=str_list, default=list(IMPLS), help=f"subset of {','.join(IMPLS)}")
    p.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="result directory (default: benchmarks/results)")
    p.add_argument("--warmup-ms", type=float, help="warm-up budget per timing in ms")
    p.add_argument("--rep-ms", type=float, help="measurement budget per timing in ms")
    p.add_argument("--cuda-graph", action="store_true",
                   help="CUDA: time CUDA-graph replays (kernel time without host launch overhead)")
    p.add_argument("--check-heads", type=int, default=4, help="query heads in the float64 check (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-check", action="store_true", help="skip the per-case correctness check")
    p.add_argument("--no-plot", action="store_true", help="write the JSON only")
    args = p.parse_args(argv)
    unknown = [i for i in args.impls if i not in IMPLS]
    if unknown:
        p.error(f"unknown implementation(s) {', '.join(unknown)}; choose from {', '.join(IMPLS)}")
    return args


def columns() -> list[Column]:
    return [Column("L", "L", 5), Column("P", "P", 4), Column("B", "B", 4), Column("mode", "mode", 7),
            Column("impl", "impl", 8), Column("ms", "ms", 10, ".4f"), Column("vs_base", "x floor", 7, ".3f"),
            Column("target_ratio", "target", 6, ".3f"), Column("meets_target", "met", 5),
            Column("vs_peer", "vs torch", 8, ".2f"), Column("tflops", "TFLOP/s", 8, ".2f"),
            Column("gbps", "GB/s", 8, ".1f"), Column("roofline_pct", "%roof", 6, ".1f"), Column("bound", "bound", 7),
            Column("rel_err", "rel_err", 8, ".1e"), Column("note", "note", 4)]


def main(argv=None) -> int:
    """Run the benchmark: every case checked, timed and printed, the JSON rewritten after each case."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    quick = (not cuda) if args.quick is None else args.quick
    preset = QUICK if quick else FULL
    lengths, prefixes = args.lengths or preset["lengths"], args.prefix_lengths or preset["prefix_lengths"]
    dims = {k: getattr(args, k) or preset[k] for k in ("tokens", "heads", "kv_heads", "head_dim")}
    if dims["heads"] % dims["kv_heads"]:
        raise SystemExit(f"--heads {dims['heads']} must be a multiple of --kv-heads {dims['kv_heads']}")
    dtype = parse_dtype(args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    timer = _driver.timer_config(cuda, quick, args)
    torch.manual_seed(args.seed)
    impls, notes = list(args.impls), []
    if "fastpeft" in impls:
        try:
            importlib.import_module("fastpeft.ops")
        except Exception as exc:
            notes.append(f"fastpeft skipped: {type(exc).__name__}: {exc}")
            impls.remove("fastpeft")
            print(f"NOTE: {notes[-1]}", flush=True)
    floor_ctx, floor_backend = floor_context(device, dtype)

    when = datetime.now(timezone.utc)
    env = environment(device, [f"benchmarks/{BENCH}.py", *argv], when=when)
    json_path = result_path(args.out, device, BENCH, when)
    print(f"Prefix attention benchmark on {env['device']['name']} ({device.type}), {dtype_name(dtype)}, "
          f"{'quick' if quick else 'full'} preset; timer: {timer.method(device)}", flush=True)
    print(f"L {lengths}; P {prefixes}; B = {dims['tokens']} // L; H {dims['heads']}, H_kv {dims['kv_heads']}, "
          f"D {dims['head_dim']}; modes {args.modes}; impls {impls}; floor: {floor_backend}", flush=True)
    peaks = measure_peaks(device, dtype, timer)
    print(f"measured peaks: matmul {peaks.matmul_tflops:.2f} TFLOP/s (mm {peaks.matmul_n}^3, {peaks.dtype}), "
          f"bandwidth {peaks.bandwidth_gbps:.1f} GB/s (copy {peaks.copy_bytes / 2**20:.0f} MiB); "
          f"ridge {peaks.ridge_flops_per_byte:.1f} flop/byte", flush=True)
    payload = {
        "benchmark": BENCH, **env, "complete": False, "notes": notes,
        "config": {"lengths": lengths, "prefix_lengths": prefixes, **dims, "batch": "tokens // L",
                   "prefix": "shared (1, H_kv, P, D)", "dtype": dtype_name(dtype), "modes": args.modes,
                   "impls": impls, "quick": quick, "seed": args.seed, "floor_backend": floor_backend,
                   "target": "ms(fastpeft, L, P) / ms(floor, L) <= (L + P) / L", "target_modes": list(TARGET_MODES),
                   "timer": {"method": timer.method(device), **vars(timer)}, "check": not args.no_check,
                   "check_slice": f"batch row 0, {args.check_heads} query heads, float64 reference"},
        "fastpeft_backends": _driver.backends(device) if "fastpeft" in impls else {},
        "peaks": peaks.to_dict(),
        "rows": [],
    }
    ctx = {"args": args, "device": device, "dtype": dtype, "dims": dims, "impls": impls, "timer": timer,
           "peaks": peaks, "floor_ctx": floor_ctx}
    all_rows: list[Row] = []
    table = TablePrinter(columns())
    table.header()
    for mode in args.modes:
        for L in lengths:
            for P in prefixes:
                case_rows = run_case(ctx, L, P, mode)
                for row in case_rows:
                    table.row(row.flat())
                all_rows += case_rows
                payload["rows"] = [row.flat() for row in all_rows]
                write_json(json_path, payload)  # after every case: a cut-off run keeps what it measured
    payload["complete"] = True
    payload["summary"] = summary([row.flat() for row in all_rows])
    write_json(json_path, payload)
    finish(args, payload, json_path, dtype)
    return 0


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


def finish(args, payload: dict, json_path: Path, dtype) -> None:
    """Print the pivots of the fastpeft rows, the target summary, and write the plot."""
    flat = payload["rows"]
    fast = [r for r in flat if r["impl"] == "fastpeft"]
    pivots = [("vs_base", "fastpeft time / floor time (SDPA on L without prefix), by L; target (L + P) / L:", ".3f"),
              ("target_ratio", "target (L + P) / L, by L:", ".3f"),
              ("vs_peer", "fastpeft speed-up over concatenate + SDPA (torch ms / fastpeft ms), by L:", ".2f")]
    for key, title, fmt in pivots:
        if fast and any(r.get(key) is not None for r in fast):
            print()
            print_pivot(fast, row_keys=("mode", "P"), col_key="L", value_key=key, title=title, fmt=fmt)
    for mode, s in payload.get("summary", {}).items():
        w = s["worst"]
        print(f"target {mode}: fastpeft meets (L + P) / L x floor in {s['met']}/{s['cases']} cases; worst L={w['L']} "
              f"P={w['P']}: {w['ratio_to_floor']:.3f} vs {w['target_ratio']:.3f}")
    print(f"\nwrote {json_path}")
    if not args.no_plot:
        title = f"Prefix attention vs SDPA without prefix: {payload['device']['name']}, {dtype_name(dtype)}"
        png = plot_ratio_to_base(flat, json_path.with_suffix(".png"), title=title, panel_key="P", x_key="L",
                                 base="floor")
        if png:
            print(f"wrote {png}")


if __name__ == "__main__":
    sys.exit(main())
