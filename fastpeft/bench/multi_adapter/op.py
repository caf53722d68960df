"""The multi-adapter op section (--modes op): the linear layer y_m = x_m Wᵀ + s_a (x_m A_aᵀ) B_aᵀ, a = the adapter
of row b(m) (none: y_m = x_m Wᵀ), x (B, L, K), over the cases of cases.py, every implementation of impls.py
checked and timed on the same inputs.

Columns: "x base" = ms / ms(base); "vs peft", "vs loop", "vs pad" = ms(that impl) / ms (> 1: faster than it);
vs_default (JSON) = ms(fastpeft) / ms for the forced fastpeft kernels; "ad_bw%" the adapter term's bandwidth
estimate (targets.py). rel_err: every impl against y (and in train dX, dA, dB) computed in float32 (CUDA) /
float64 (CPU) on the first pool item; MISMATCH above checks.TOLERANCE.
L2: every pool item holds its own W, x and its own registered adapter set (its LoRABank, PEFT layer and padded
stacks), so the pool rotates banks of adapters; it has >= 3 items (CUDA) and a pass touches > 2x L2; on top,
triton's do_bench clears L2 before every timed call (not under --cuda-graph, where the pool alone keeps them cold;
under --cuda-graph PEFT, which copies its row indices from the host on every call, cannot be captured: an error row).
Rows in payload["rows"], the targets in payload["summary"].
"""
from __future__ import annotations

import argparse
import time
import zlib

import torch

from fastpeft.ops import Routing, kernel_options

from ..checks import max_rel_err, tolerance
from ..devices import dtype_name, failure_note, free_memory
from ..driver import Run, Section, backends
from ..inputs import InputPool
from ..optional import load
from ..options import choice_list, positive_ints, shape_list
from ..report import Column, plot_ratio_to_base, print_pivot
from ..roofline import Row, fill_metrics
from ..timing import time_ms
from .cases import (FULL, MIXED_RANKS, NONE_REGISTERED, PHASES, QUICK, RANKS, SCALES, SCENARIOS, ZIPF_EXPONENT,
                    adapter_sums, adapter_term_bytes, case_specs, multi_bytes, multi_flops, n_label, registered_count,
                    row_slots, slot_ranks)
from .impls import FAST_IMPLS, case_impls, forward, grad_inputs, make_item, reference_outputs, routing_us
from .targets import print_summary, summary

MODE = "op"


# ------------------------------------------------------------------------------------------------------------
# One case
# ------------------------------------------------------------------------------------------------------------

def run_case(run: Run, spec: dict) -> list[Row]:
    """Check and time every impl of one case on one shared input pool (each item its own adapters)."""
    args, device, dtype = run.args, run.device, run.dtype
    phase, K, N, B, L, scenario, n, rank = (spec[k] for k in ("phase", "K", "N", "B", "L", "scenario", "n", "rank"))
    M = B * L
    elem = run.elem
    key = f"{args.seed}/{phase}/{K}x{N}/{B}/{L}/{scenario}/{n}/{rank}"
    generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    registered = registered_count(scenario, n)
    slots = row_slots(scenario, n, B, generator)
    ranks = slot_ranks(rank, registered)
    scales = [SCALES[i % len(SCALES)] for i in range(registered)]
    token_rank, distinct_rank = adapter_sums(slots, ranks, L)
    used = sorted({s for s in slots if s >= 0})
    case = {"shape": f"{K}x{N}", "K": K, "N": N, "B": B, "L": L, "M": M, "scenario": scenario, "n": n,
            "distinct": len(used), "rank": rank, "registered": registered, "dtype": dtype_name(dtype)}
    impls = case_impls(run.impls, phase, M)
    limit = tolerance(dtype)
    rows = []

    def new_row(impl, ms=None, note="", err=None, extra=None):
        return Row(run.family.bench, case, phase, impl, ms, multi_flops(M, K, N, token_rank, phase, impl),
                   multi_bytes(M, K, N, distinct_rank, phase, impl, elem), rel_err=err, note=note, extra=extra or {})

    routing = Routing.build(slots, registered, device, tokens_per_slot=L)
    groups_host = list(routing.segments())
    ctx = {"routing": routing, "groups_host": groups_host, "scales": scales,
           "groups": [(s, rows.to(device)) for s, rows in groups_host],
           "peft_names": [f"a{s}" if s >= 0 else "__base__" for s in slots],
           "pad_index": torch.tensor([s if s >= 0 else registered for s in slots], device=device)}
    rt_us = routing_us(slots, registered, device, L, 5 if run.quick else 20)

    def step(impl, item):
        y = forward(impl, item, ctx)
        if phase != "train":
            return [y]
        return [y, *torch.autograd.grad(y, grad_inputs(impl, item, used), item["dy"])]

    slot_info = {"ranks": ranks, "scales": scales}
    try:
        pool = InputPool.build(lambda: make_item(spec, slot_info, impls, dtype, device, run.peft), device,
                               **run.ctx["pool"])
    except Exception as exc:  # typically out of memory for the largest cases: record and go on
        free_memory(device)
        note = f"inputs failed: {type(exc).__name__}: {str(exc)[:160]}"
        print(f"  {case} {phase}: {note}", flush=True)
        return [new_row(impl, note=note) for impl in impls]
    refs = None
    if not args.no_check:
        try:
            refs = reference_outputs(pool.first, ctx, run.ctx["ref_dtype"], phase == "train")
        except Exception as exc:
            print(f"  check skipped for {case} {phase}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
            free_memory(device)
    grad_mode = torch.enable_grad if phase == "train" else torch.no_grad

    def failed(impl, exc, what=""):
        free_memory(device)
        note = failure_note(exc, what)
        print(f"  {impl} {phase} {case}: {note}", flush=True)
        return note

    errs, notes = {}, {}
    for impl in impls if refs is not None else ():  # every check first, then the references are freed
        try:
            with grad_mode():
                errs[impl] = max_rel_err(step(impl, pool.first), refs["base" if impl == "base" else "multi"])
            if not errs[impl] <= limit:  # also true for nan
                notes[impl] = "MISMATCH"
                print(f"  WARNING: {impl} {phase} {case}: rel_err {errs[impl]:.2e} exceeds {limit}", flush=True)
        except Exception as exc:
            notes[impl] = failed(impl, exc, " in the check")
    del refs
    free_memory(device)
    for impl in impls:
        ms, note = None, notes.get(impl, "")
        if not note.startswith(("error", "OOM")):
            try:
                with grad_mode():
                    ms = time_ms(lambda: step(impl, pool.next()), device, run.timer)
            except Exception as exc:
                note = failed(impl, exc)
        rows.append(new_row(impl, ms, note, errs.get(impl), {
            "pool_copies": len(pool), "pool_bytes": pool.item_bytes * len(pool), "routing_us": rt_us,
            "n_label": n_label(scenario, n, B)}))
    del pool
    free_memory(device)
    fill_metrics(rows, run.peaks, base="base", peer="peft")
    case_metrics(rows, run.peaks, adapter_term_bytes(M, K, N, distinct_rank, elem))
    return rows


def case_metrics(rows: list[Row], peaks, term_bytes: float) -> None:
    """vs_loop, vs_padded, vs_default (forced fastpeft kernels) and, for fastpeft* at decode, adapter_bw_pct."""
    ms = {r.impl: r.ms for r in rows if r.ms}
    for row in rows:
        e = row.extra
        e["vs_loop"] = ms["loop"] / row.ms if row.ms and "loop" in ms else None
        e["vs_padded"] = ms["padded_bmm"] / row.ms if row.ms and "padded_bmm" in ms else None
        e["vs_default"] = (ms["fastpeft"] / row.ms if row.ms and "fastpeft" in ms and row.impl in FAST_IMPLS[1:]
                           else None)
        e["adapter_bw_pct"] = None
        if (row.impl in FAST_IMPLS and row.mode == "decode" and row.case["distinct"] and row.ms and "base" in ms
                and row.ms > ms["base"] and peaks is not None):
            e["adapter_bw_pct"] = 100.0 * term_bytes / ((row.ms - ms["base"]) * 1e-3) / (peaks.bandwidth_gbps * 1e9)


def columns() -> list[Column]:
    return [Column("shape", "KxN", 11), Column("mode", "phase", 7), Column("B", "B", 3),
            Column("scenario", "scen", 7), Column("n", "n", 3), Column("distinct", "dist", 4),
            Column("rank", "rank", 5),
            Column("impl", "impl", 16), Column("ms", "ms", 9, ".4f"), Column("vs_base", "x base", 6, ".2f"),
            Column("vs_peer", "vs peft", 7, ".2f"), Column("vs_loop", "vs loop", 7, ".2f"),
            Column("vs_padded", "vs pad", 6, ".2f"), Column("roofline_pct", "%roof", 5, ".1f"),
            Column("adapter_bw_pct", "ad_bw%", 6, ".1f"), Column("routing_us", "rt_us", 6, ".0f"),
            Column("rel_err", "rel_err", 7, ".0e"), Column("note", "note", 4)]


# ------------------------------------------------------------------------------------------------------------
# The section
# ------------------------------------------------------------------------------------------------------------

def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--phases", type=choice_list(PHASES, "phases"), default=list(PHASES),
                   help="op: decode,prefill,train (default all)")
    p.add_argument("--shapes", type=shape_list, help="op: KxN list (default the Llama-7B linears; quick 256x256,...)")
    p.add_argument("--batches", type=positive_ints, help="op: batch sizes B for decode and prefill "
                   "(default decode 1,4,16,64,256 and prefill 1,4,16,64)")
    p.add_argument("--scenarios", type=choice_list(SCENARIOS, "scenarios"), default=list(SCENARIOS),
                   help="op: keep the preset's cases of these scenarios (uniform,zipf,none)")
    p.add_argument("--ranks", type=choice_list(RANKS, "ranks"), default=list(RANKS),
                   help="op: keep the preset's cases of these ranks (8,16,64,mixed)")
    p.add_argument("--prefill-len", type=int, help="op: tokens per row in prefill and train (default 512, quick 8)")


def cuda_ext_status(device: torch.device) -> tuple[bool, str]:
    """Whether fastpeft_cuda can run: fastpeft.ops.cuda_ext.status(), then load() (compiles on first use)."""
    if device.type != "cuda":
        return False, f"the CUDA C++ kernel needs a CUDA device (running on {device.type})"
    from fastpeft.ops import cuda_ext

    ok, why = cuda_ext.status()
    if not ok:
        return False, why
    print(f"fastpeft_cuda: loading the CUDA C++ extension ({why}; a cold build takes minutes)", flush=True)
    start = time.perf_counter()
    try:
        cuda_ext.load()
    except Exception as exc:
        return False, f"cuda_ext.load() failed: {type(exc).__name__}: {str(exc)[:200]}"
    return True, f"{why} (load took {time.perf_counter() - start:.1f} s)"


def prepare(run: Run) -> tuple[str, dict]:
    """The op cases and impls (base always; peft and fastpeft_cuda dropped with a note where they cannot run) -> the
    banner line, and the JSON's "config", "cuda_ext" and "fastpeft_backends"."""
    args, device, cuda, dtype = run.args, run.device, run.cuda, run.dtype
    preset = QUICK if run.quick else FULL
    shapes = args.shapes or preset["shapes"]
    prefill_len = args.prefill_len or preset["prefill_len"]
    if "base" not in run.impls:
        run.impls.insert(0, "base")
    selected = MODE in args.modes
    if "peft" in run.impls and selected:
        run.peft, why = load("peft.tuners.lora.layer", "Linear")
        if why:
            run.note(f"peft skipped: {why}")
            run.impls.remove("peft")
    cuda_ok, cuda_why = (False, "not requested")
    if "fastpeft_cuda" in run.impls and selected:
        cuda_ok, cuda_why = cuda_ext_status(device)
        if not cuda_ok:
            run.note(f"fastpeft_cuda skipped: {cuda_why}")
            run.impls.remove("fastpeft_cuda")
    specs = case_specs(preset, args.phases, shapes, args.batches, args.scenarios, args.ranks, prefill_len) \
        if selected else []
    pool = {"min_copies": 3, "max_copies": 16} if cuda else {"min_copies": 2, "max_copies": 3}
    run.ctx.update(preset=preset, shapes=shapes, specs=specs, pool=pool,
                   ref_dtype=torch.float32 if cuda else torch.float64)
    decode_max_tokens = kernel_options().decode_max_tokens
    banner = (f"{len(specs)} op cases: shapes {', '.join(f'{k}x{n}' for k, n in shapes)}; phases {args.phases}; "
              f"prefill L {prefill_len}; impls {run.impls}; fastpeft decode_max_tokens {decode_max_tokens}; "
              f"CUDA C++ kernel: {cuda_why}")
    config = {"preset": "quick" if run.quick else "full", "shapes": [f"{k}x{n}" for k, n in shapes],
              "phases": args.phases, "modes": args.modes, "batches": args.batches,
              **{k: preset[k] for k in ("decode_batches", "prefill_batches", "uniform_n", "rank_batches",
                                        "zipf_batches", "mixed_batches", "zipf_pool", "train", "target")},
              "prefill_len": prefill_len, "scenarios": args.scenarios, "ranks": args.ranks,
              "mixed_ranks": list(MIXED_RANKS), "scales": list(SCALES), "zipf_exponent": ZIPF_EXPONENT,
              "none_registered": NONE_REGISTERED, "cases": len(specs), "adapter_dtype": dtype_name(dtype),
              "impls": run.impls, "decode_max_tokens": decode_max_tokens,
              "cpu_threads": None if cuda else torch.get_num_threads(), "pool": pool,
              "reference": "float32" if cuda else "float64",
              "cost_model": {"flops": "fwd 2MNK + sum_a 2 M_a r_a (K+N); train + 2MNK + sum_a 4 M_a r_a (K+N)",
                             "bytes": "fwd e(MK + NK + MN + sum_distinct r_a (K+N)); train "
                                      "(fastpeft.bench.multi_adapter.cases docstring)",
                             "adapter_bw_pct": "e(sum_distinct r_a (K+N) + MK + 2MN) / (ms - ms_base) / "
                                               "copy bandwidth (estimate)"}}
    return banner, {"config": config, "cuda_ext": {"usable": cuda_ok, "why": cuda_why},
                    "fastpeft_backends": backends(device)}


def run_op(run: Run) -> None:
    """Every op case, recorded as it finishes; then the targets in payload["summary"]."""
    specs = run.ctx["specs"]
    if not specs:
        return
    table = run.table(columns())
    for spec in specs:
        run.record("rows", run_case(run, spec), table)
    run.payload["summary"] = summary(run.payload["rows"], run.ctx["preset"], run.ctx["shapes"], run.cuda,
                                     run.peaks.bandwidth_gbps, run.elem)
    run.write()


def report_op(run: Run) -> None:
    """The pivots of the op rows and the targets."""
    flat = run.payload["rows"]
    keys = ("mode", "shape", "scenario", "n_label", "rank")
    pivots = [("fastpeft", "vs_base", "fastpeft time / base time (1.00 = free adapters), by B:", None),
              ("fastpeft", "vs_peer", "fastpeft speed-up over peft (peft ms / fastpeft ms), by B:", None),
              ("fastpeft", "vs_padded", "fastpeft speed-up over padded_bmm, by B:", None),
              ("fastpeft", "vs_loop", "fastpeft speed-up over the PyTorch loop, by B:", None),
              ("fastpeft", "adapter_bw_pct", "decode: fastpeft's adapter term, % of copy bandwidth (estimate), by B:",
               "decode")]
    for impl, key, title, mode in pivots:
        rows = [r for r in flat if r["impl"] == impl and (mode is None or r["mode"] == mode)]
        if rows and any(r.get(key) is not None for r in rows):
            print()
            print_pivot(rows, row_keys=keys, col_key="B", value_key=key, title=title)
    others = [r for r in flat if r["impl"] in FAST_IMPLS[1:] and r.get("vs_default") is not None]
    if others:
        print()
        print_pivot(others, row_keys=("shape", "scenario", "n_label", "rank", "impl"), col_key="B",
                    value_key="vs_default", title="decode: ms(fastpeft default) / ms(forced kernel), by B (> 1: the "
                                                  "forced kernel is faster):")
    if run.payload.get("summary"):
        print_summary(run.payload["summary"], run.device.type)


def plot(run: Run):
    """Time / base time of the rank-16 decode and prefill rows, by B: one panel per shape, a line per mix."""
    flat = run.payload["rows"]
    if not flat:
        return None
    plotted = [dict(r, mix=r["scenario"] if r["scenario"] != "uniform" else "uniform n=B") for r in flat
               if r["mode"] != "train" and r["rank"] == "16" and (r["scenario"] != "uniform" or r["n_label"] == "all")]
    title = f"Multi-adapter LoRA (rank 16) vs base linear: {run.payload['device']['name']}, {dtype_name(run.dtype)}"
    return plot_ratio_to_base(plotted, run.json_path.with_suffix(".png"), title=title, panel_key="shape", x_key="B",
                              style_key="mix")


SECTION = Section(modes=(MODE,), run=run_op, report=report_op, options=options)
