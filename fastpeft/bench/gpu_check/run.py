"""The gpu-check run: settings, the sections in order, the strategy table, the files (the package docstring)."""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from fastpeft.ops.dispatch import interpreting

from ..devices import device_slug, dtype_name, failure_note, parse_dtype
from ..driver import backends
from ..results import RESULTS_DIR, environment
from ..roofline import measure_peaks
from . import linear, moe, multi, prefix, quantized, serving, summary, targets, tier, train
from .context import Check, quick_autotune
from .plan import DRY, GPU, Budget, Guard

COMMIT_ENV = "FASTPEFT_GIT_COMMIT"  # the commit to record where the checkout has no .git (a copied tree)


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastpeft.bench.gpu_check", description=(
        "The first command on a lent GPU (make gpu-check): the GPU test tier, the device's ceilings, every family "
        "with both strategies, PEFT and the base op, a Llama training step, the strategy table; within 8 minutes."))
    p.add_argument("--dry-run", action="store_true", help="the same code on the CPU: Triton's interpreter, tiny "
                   "sizes, files into a temporary directory (or --out), fastpeft/data/strategies.json untouched")
    p.add_argument("--out", type=Path, help="result directory (default: benchmarks/results; dry run: a temp dir)")
    p.add_argument("--commit", default=os.environ.get(COMMIT_ENV),
                   help=f"the git commit to record when git cannot tell (default ${COMMIT_ENV})")
    p.add_argument("--skip-tests", action="store_true", help="leave out the GPU test tier (a rerun)")
    p.add_argument("--budget-s", type=float,
                   help=f"seconds for the run after its imports (default {GPU.total_s:.0f} on the GPU)")
    p.add_argument("--autotune-configs", type=int, help="configs autotune tries per key in the sections (default 5; "
                   "0: all, as a user's process; a rerun with a warm Triton cache can afford it)")
    return p.parse_args(argv)


def new_check(args, argv) -> Check:
    """Device, plan, clock, the result file's place and the JSON's environment part."""
    plan = DRY if args.dry_run else GPU
    changes = {"total_s": args.budget_s, "autotune_configs": args.autotune_configs}
    plan = dataclasses.replace(plan, **{k: v for k, v in changes.items() if v is not None})
    device = torch.device("cpu" if args.dry_run else "cuda")
    when = datetime.now(timezone.utc)
    out = args.out or (Path(tempfile.mkdtemp(prefix="fastpeft-gpu-check-")) if args.dry_run else RESULTS_DIR)
    json_path = Path(out) / f"gpu-check-{device_slug(device)}-{when.strftime('%Y%m%d-%H%M%S')}.json"
    env = environment(device, ["-m", "fastpeft.bench.gpu_check", *argv], when=when)
    if args.commit and not env["git"].get("commit"):
        env["git"] = {**env["git"], "commit": args.commit, "source": f"--commit / ${COMMIT_ENV}"}
    dtype = parse_dtype(plan.dtype)
    payload = {"benchmark": "gpu-check", **env, "dry_run": args.dry_run, "complete": False, "dtype": dtype_name(dtype),
               "budget": {"total_s": plan.total_s, "tier_s": plan.tier_s}, "plan": dataclasses.asdict(plan),
               "notes": [], "sections": {}}
    check = Check(args.dry_run, plan, device, dtype, Budget(plan.total_s), json_path, payload,
                  backend="triton" if args.dry_run else None)
    payload["notes"] = check.notes
    return check


def run_peaks(check: Check) -> None:
    """The ceilings: cuBLAS GEMM (2n³ flops) and device-to-device copy (2 x bytes), timed like every row."""
    guard = Guard(check.budget, "peaks")
    try:
        check.peaks = measure_peaks(check.device, check.dtype, check.plan.timer, **check.plan.peaks)
        check.payload["peaks"] = check.peaks.to_dict()
        print(f"ceilings: copy {check.peaks.bandwidth_gbps:.0f} GB/s, GEMM {check.peaks.matmul_tflops:.1f} TFLOP/s",
              flush=True)
    except Exception as exc:  # the rows then go without roofline figures
        check.note(f"peaks: {failure_note(exc)}")
    check.payload["peaks_guard"] = guard.record()
    check.write()


def strategy_table(check: Check) -> dict:
    """The table chosen from the fwd+bwd rows (targets.RULE); on a real GPU written to fastpeft/data/strategies.json
    (other devices' entries kept) and, as a copy to bring back, next to the JSON."""
    try:
        from fastpeft.ops import strategy
    except ImportError as exc:
        return {"rule": targets.RULE, "choices": {}, "written": [], "why_not_written": f"no strategy module: {exc}"}
    choices = targets.choose_strategies(check.payload["sections"], strategy.DEFAULT, strategy.row_bucket)
    device, dtype = strategy.device_name(check.device), str(check.dtype).removeprefix("torch.")
    out = {"rule": targets.RULE, "device": device, "dtype": dtype, "choices": choices, "written": []}
    if check.dry_run or not check.cuda:
        out["why_not_written"] = "dry run: the table goes into this JSON only"
        return out
    devices = copy.deepcopy(strategy.load_table())
    devices.get(device, {}).pop(dtype, None)  # this device's other dtypes (and other devices) stay
    for op, per in choices.items():
        strategy.record(devices, device, dtype, op, {bucket: c["choice"] for bucket, c in per.items()})
    source = (f"make gpu-check on {device}, {check.payload['date']}, commit {check.payload['git'].get('commit')} "
              f"(benchmarks/results/{check.json_path.name}): {targets.RULE}")
    for path in (strategy.TABLE, check.sibling("-strategies.json")):
        try:
            strategy.write_table(devices, path, source)
            out["written"].append(str(path))
        except OSError as exc:
            check.note(f"strategy table: writing {path} failed: {exc}")
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; `make gpu-check DRY_RUN=1` runs the same code on the CPU.",
              file=sys.stderr)
        return 2
    check = new_check(args, argv)
    p = check.payload
    print(f"gpu-check on {p['device']['name']} ({'dry run, ' if args.dry_run else ''}{p['dtype']}); "
          f"results: {check.json_path}", flush=True)
    torch.manual_seed(0)
    p["autotune"] = quick_autotune(check.plan.autotune_bench, check.plan.autotune_configs)
    p["triton_interpreter"] = interpreting()
    if args.dry_run and not interpreting():
        check.note("the dry run is not under Triton's interpreter: the fastpeft rows run whatever the CPU dispatches")
    p["fastpeft_backends"] = backends(check.device)
    files = tier.gpu_test_files()
    if args.skip_tests:
        p["gpu_tests"] = {"ran": False, "why": "--skip-tests"}
    else:
        p["gpu_tests"] = tier.run_tier(files[:2] if args.dry_run else files, check.plan.tier_s,
                                       check.sibling("-gpu-tests.log"))
        p["gpu_tests"]["autotune"] = f"{tier.PLUGIN}: at most {check.plan.tier_configs} configs per tuning key"
    check.write()
    run_peaks(check)
    for name, section in (("lora", linear.run_lora), ("dora", linear.run_dora), ("ia3", linear.run_ia3),
                          ("multi_lora", lambda c: multi.run_multi(c, p["gpu_tests"])),
                          ("prefix_attention", prefix.run_prefix), ("train_step", train.run_train),
                          ("lora_4bit", quantized.run_lora_4bit), ("qlora", quantized.run_qlora),
                          ("serve", serving.run_serve), ("moe", moe.run_moe)):
        try:
            section(check)
        except Exception as exc:  # a section that fails is recorded; the next one runs
            check.note(f"{name}: the section failed: {failure_note(exc)}")
    finish(check)
    return 0


def finish(check: Check) -> None:
    """Targets, strategy table, the complete JSON, plots and markdown; the markdown printed last. A step that fails
    is noted and the others still run."""
    p = check.payload
    p["targets"], p["strategy_table"] = [], {}
    for key, step in (("targets", lambda: targets.compute(p["sections"], applicable=check.cuda)),
                      ("strategy_table", lambda: strategy_table(check))):
        try:
            p[key] = step()
        except Exception as exc:
            check.note(f"{key}: {failure_note(exc)}")
    p["wall_s"] = round(check.budget.elapsed(), 1)
    p["complete"] = True
    check.write()
    started = time.monotonic()
    try:
        pngs = summary.plots(p, check.sibling)
    except Exception as exc:  # the JSON and the summary matter more than the pictures
        pngs = []
        print(f"plots failed: {failure_note(exc)}", flush=True)
    text = summary.markdown(p)
    md = check.sibling(".md")
    md.write_text(text)
    print(f"\nwrote {check.json_path}, {md.name}, {', '.join(path.name for path in pngs) or 'no plots'} "
          f"({time.monotonic() - started:.1f} s)\n", flush=True)
    print(text, flush=True)
