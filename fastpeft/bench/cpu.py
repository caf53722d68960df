"""The CPU path against PEFT, method by method: one training step (forward with labels, backward, AdamW step) and one
inference forward of a random Llama holding each adapter, fastpeft and PEFT in the same process, timed in
alternating runs (PEFT first on even repetitions, fastpeft first on odd ones), the median of each.

    fastpeft bench cpu                       # hidden 512, 4 layers, seq 256, batch 4, fp32, 2 threads, every method
    fastpeft bench cpu --quick               # a tiny model and 3 repetitions (seconds)
    fastpeft bench cpu --methods lora,lora_dropout,prefix --reps 11 --threads 2
    fastpeft bench cpu --threads 1 --clock cpu   # CPU time: steadier where other jobs share the machine
    python -m fastpeft bench cpu --quick     # the same without the console script

This family runs on the CPU whatever the machine has (--device cpu is its default) and its full preset is the
default (--quick selects the small one). The model: LlamaForCausalLM from a config (random weights, no download),
SDPA attention, frozen; full: hidden 512, 4 layers, 8 heads (head dim 64), intermediate 1376, vocab 4096, batch 4 x
seq 256; quick: hidden 64, 2 layers, 4 heads, intermediate 128, vocab 128, batch 2 x seq 32. torch.set_num_threads
(--threads, default 2) for the run, restored after it.
Methods (PEFT's defaults for Llama where not stated; every method fastpeft shares with PEFT):
    lora, lora_dropout (0.05), rslora, dora   r 8, alpha 16, q_proj and v_proj
    ia3                                        k_proj, v_proj, down_proj (feed-forward)
    adalora                                    init_r 12, target_r 8, total_step 1000 (the rank allocator's
                                               update_and_allocate is the training loop's, not timed)
    prefix, prefix_mlp                         30 virtual tokens, flat / PEFT's prefix_projection (encoder width:
                                               the hidden size)
    prompt, p_tuning                           20 virtual tokens; P-tuning's MLP encoder of width 128
    llama_adapter                              adapter_len 10 on every layer (PEFT's AdaptionPrompt)
Each pair computes the same function: PEFT's adapter, its weights moved off their initial values (B, E and the IA3
vectors are identity-like at init), is saved and loaded into fastpeft (fp.load_adapter), or, for prefix tuning and
P-tuning (whose checkpoints hold the encoder's output), fastpeft's own config gets PEFT's parameters copied in.
Checked once per method before timing: the inference logits (rel_err, fastpeft against PEFT) and, for methods
without dropout, the training loss (loss_err). Not checked: the dropout masks (each library draws its own).
Columns: ms (median), min, "peft/fp" = ms(peft) / ms(fastpeft) (> 1: fastpeft faster), "paired" = the median of
the repetitions' own ratios (PEFT's run over the fastpeft run next to it: slow drifts of a shared machine cancel),
"lo".."hi" = a distribution-free ~95 % confidence interval of that median (binomial order statistics of the paired
ratios). Where both libraries run the same PyTorch for the frozen model, the ratio is 1 within the machine's noise;
the verdict after the table names the entries slower beyond noise (hi < 1) and faster beyond noise (lo > 1).
Timing (--clock): wall time by default; "cpu" sums the process's CPU time instead, which other jobs on a shared
machine disturb far less (with several threads it also counts the OpenMP workers' spinning). The JSON
(benchmarks/results/cpu-<cpu>-cpu-<date>.json) holds the rows (every repetition's time in "times_ms"), the model
and method settings in "config" and the table in "summary" (method -> mode -> ratio).
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import tempfile

import torch

from . import driver
from .alternating import CLOCKS, alternate, steps
from .devices import failure_note
from .driver import Run, Section
from .models import random_llama
from .optional import importable_impls
from .options import add_int_options, choice_list
from .report import Column, print_pivot
from .roofline import Row, fill_metrics

BENCH = "cpu"
IMPLS = ("fastpeft", "peft")
MODES = {"train": "train", "training": "train", "step": "train", "infer": "infer", "inference": "infer",
         "forward": "infer"}
DIMS = ("hidden", "layers", "heads", "intermediate", "vocab", "seq", "batch", "reps")
FULL = {"hidden": 512, "layers": 4, "heads": 8, "intermediate": 1376, "vocab": 4096, "seq": 256, "batch": 4,
        "reps": 7}
QUICK = {"hidden": 64, "layers": 2, "heads": 4, "intermediate": 128, "vocab": 128, "seq": 32, "batch": 2, "reps": 3}
LORA = {"r": 8, "lora_alpha": 16}
METHODS = ("lora", "lora_dropout", "rslora", "dora", "ia3", "adalora", "prefix", "prefix_mlp", "prompt", "p_tuning",
           "llama_adapter")


# ------------------------------------------------------------------------------------------------------------
# The pairs of models
# ------------------------------------------------------------------------------------------------------------

def peft_config(method: str, dims: dict):
    """PEFT's config of a method (CAUSAL_LM)."""
    import peft

    task = {"task_type": "CAUSAL_LM"}
    return {
        "lora": lambda: peft.LoraConfig(**task, **LORA),
        "lora_dropout": lambda: peft.LoraConfig(**task, **LORA, lora_dropout=0.05),
        "rslora": lambda: peft.LoraConfig(**task, **LORA, use_rslora=True),
        "dora": lambda: peft.LoraConfig(**task, **LORA, use_dora=True),
        "ia3": lambda: peft.IA3Config(**task),
        "adalora": lambda: peft.AdaLoraConfig(**task, init_r=12, target_r=8, lora_alpha=16, total_step=1000),
        "prefix": lambda: peft.PrefixTuningConfig(**task, num_virtual_tokens=30),
        "prefix_mlp": lambda: peft.PrefixTuningConfig(**task, num_virtual_tokens=30, prefix_projection=True,
                                                      encoder_hidden_size=dims["hidden"]),
        "prompt": lambda: peft.PromptTuningConfig(**task, num_virtual_tokens=20),
        "p_tuning": lambda: peft.PromptEncoderConfig(**task, num_virtual_tokens=20, encoder_hidden_size=128),
        "llama_adapter": lambda: peft.AdaptionPromptConfig(**task, adapter_len=10, adapter_layers=dims["layers"]),
    }[method]()


@torch.no_grad()
def _move_off_init(model, seed: int) -> None:
    """Add small noise to the trainable parameters (LoRA's B, AdaLoRA's E and IA3's vectors start identity-like)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(0.02 * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))


def shared_copy(base):
    """A copy of the frozen model whose modules are its own (each library rewires them) and whose parameters are the
    base's tensors: both libraries' models read the same weight memory, so where it lies cannot favour either."""
    return copy.deepcopy(base, memo={id(p): p for p in base.parameters()})


def build_pair(method: str, base, dims: dict, seed: int) -> dict:
    """{"peft": PEFT's model, "fastpeft": fastpeft's} on copies of `base` sharing its weights, computing the same
    function."""
    import peft

    import fastpeft as fp

    from .prefix_attention.step import copy_prefix

    theirs = peft.get_peft_model(shared_copy(base), peft_config(method, dims))
    _move_off_init(theirs, seed)
    ours = shared_copy(base)
    if method in ("prefix", "prefix_mlp"):  # PEFT's positions (shift_positions), its flat or MLP prefix
        fp.add_adapter(ours, "p", fp.PrefixTuningConfig(prefix_length=30, bottleneck_size=dims["hidden"],
                                                        flat=method == "prefix", shift_positions=True))
        copy_prefix(ours, theirs)
    elif method == "p_tuning":
        fp.add_adapter(ours, "a", fp.PTuningConfig(prompt_length=20, encoder_hidden_size=128))
        from fastpeft.modules.prompt import PromptEncoder
        encoder = next(m for m in ours.modules() if isinstance(m, PromptEncoder))
        encoder.load_state_dict(theirs.prompt_encoder["default"].state_dict())
    else:
        with tempfile.TemporaryDirectory() as folder:
            theirs.save_pretrained(folder)
            fp.load_adapter(ours, folder, name="a")
    return {"fastpeft": ours, "peft": theirs}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_pair(models: dict, ids: torch.Tensor, dropout: bool) -> dict:
    """Inference logits (fastpeft against PEFT) and, without dropout, the training loss."""
    out = {}
    with torch.no_grad():
        logits = {}
        for impl, model in models.items():
            model.eval()
            logits[impl] = model(input_ids=ids, use_cache=False).logits
        L = ids.shape[1]  # prompt methods: PEFT's logits include the virtual tokens' positions
        out["rel_err"] = _rel(logits["fastpeft"][:, -L:], logits["peft"][:, -L:])
        if not dropout:
            losses = {}
            for impl, model in models.items():
                model.train()
                losses[impl] = model(input_ids=ids, labels=ids, use_cache=False).loss
            out["loss_err"] = _rel(losses["fastpeft"], losses["peft"])
    return out


# ------------------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------------------

def run_method(run: Run, method: str, base, dims: dict, ids: torch.Tensor) -> list[Row]:
    """Build, check and time one method: a row per (mode, impl)."""
    case = {"method": method, "threads": run.ctx["threads"], "tokens": ids.numel()}
    rows, note, check = [], "", {}
    try:
        models = build_pair(method, base, dims, run.args.seed)
        if not run.args.no_check:
            check = check_pair(models, ids, dropout=method == "lora_dropout")
    except Exception as exc:
        models, note = {}, failure_note(exc, " building")
        print(f"  {method}: {note}", flush=True)
    fns = steps(models, ids)
    for mode in run.ctx["modes"]:
        times = {}
        if models:
            for model in models.values():
                model.train(mode == "train")
            try:
                times = alternate({impl: fns[impl][mode] for impl in IMPLS}, run.ctx["dims"]["reps"],
                                  CLOCKS[run.args.clock])
            except Exception as exc:
                note = failure_note(exc)
                print(f"  {method} {mode}: {note}", flush=True)
        for impl in IMPLS:
            t = times.get(impl)
            extra = {"min_ms": min(t) if t else None, "times_ms": t or [],
                     "trainable_params": sum(p.numel() for p in models[impl].parameters() if p.requires_grad)
                     if impl in models else None, "loss_err": check.get("loss_err")}
            rows.append(Row(BENCH, case, mode, impl, statistics.median(t) if t else None, 0.0, 0.0,
                            rel_err=check.get("rel_err"), note=note, extra=extra))
    fill_metrics(rows, None, base="peft", peer="peft")
    for row in rows:
        row.extra["ratio"] = row.vs_peer
        ours, theirs = (next(r.extra["times_ms"] for r in rows if r.mode == row.mode and r.impl == impl)
                        for impl in ("fastpeft", "peft"))
        paired = [p / f for p, f in zip(theirs, ours)]
        row.extra["paired_ratio"] = statistics.median(paired) if paired else None
        row.extra["paired_lo"], row.extra["paired_hi"] = median_interval(paired)
    return rows


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float | None, float | None]:
    """A distribution-free confidence interval of the median: (x_(k), x_(n+1-k)) of the sorted values, k the largest
    rank with P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2 (k = 1 when n is too small for the confidence: the
    range). (None, None) for no values."""
    n = len(values)
    if not n:
        return None, None
    xs, tail, k = sorted(values), (1 - confidence) / 2, 1
    below = math.comb(n, 0) / 2**n  # P(B < k + 1) for k = 1
    while k < (n + 1) // 2 and below + math.comb(n, k) / 2**n <= tail:
        below += math.comb(n, k) / 2**n
        k += 1
    return xs[k - 1], xs[n - k]


# ------------------------------------------------------------------------------------------------------------
# The family
# ------------------------------------------------------------------------------------------------------------

def options(p: argparse.ArgumentParser) -> None:
    p.set_defaults(device="cpu", quick=False)  # the CPU path, full size, unless asked otherwise
    p.add_argument("--methods", type=choice_list(METHODS, "methods"), default=list(METHODS),
                   help=f"subset of {','.join(METHODS)} (default: all)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for the run (default 2)")
    p.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                   help="wall: time.perf_counter (default); cpu: time.process_time, the process's CPU time (all its "
                        "threads), steadier on a machine other jobs share (best with --threads 1)")
    add_int_options(p, {f"--{k}": f"model/run size (full {FULL[k]}, quick {QUICK[k]})" for k in DIMS})


def prepare(run: Run) -> tuple[str, dict]:
    args = run.args
    preset = QUICK if run.quick else FULL
    dims = {k: getattr(args, k) or preset[k] for k in DIMS}
    if dims["hidden"] % dims["heads"]:
        raise SystemExit(f"--hidden {dims['hidden']} must be a multiple of --heads {dims['heads']}")
    if args.threads < 1:
        raise SystemExit("--threads must be at least 1")
    if run.device.type != "cpu":
        run.note(f"fastpeft bench cpu times the CPU path; --device {run.device} is ignored")
    run.ctx.update(dims=dims, modes=[m for m in ("train", "infer") if m in args.modes], methods=args.methods,
                   threads=args.threads, previous_threads=torch.get_num_threads())
    torch.set_num_threads(args.threads)  # before the roofline probe: the peaks are the run's
    config = {**dims, "kv_heads": dims["heads"], "model": "LlamaForCausalLM, random weights, sdpa attention",
              "threads": args.threads, "methods": args.methods, "modes": run.ctx["modes"],
              "lora": "r 8, alpha 16, PEFT's default targets (q_proj, v_proj)", "optimizer": "AdamW(lr=1e-4)",
              "train": "zero_grad, forward with labels = input ids, backward, AdamW step",
              "infer": "forward under torch.no_grad, eval mode",
              "clock": args.clock,
              "timing": f"{'time.perf_counter' if args.clock == 'wall' else 'time.process_time'}, impls alternating "
                        "(order flipped every repetition), median",
              "ratio": "ms(peft) / ms(fastpeft)"}
    banner = (f"Llama hidden {dims['hidden']}, {dims['layers']} layers, seq {dims['seq']}, batch {dims['batch']}, "
              f"{args.threads} threads, {dims['reps']} repetitions, {args.clock} clock; methods {args.methods}")
    return banner, {"config": config, "summary": {}}


def columns() -> list[Column]:
    return [Column("method", "method", 13), Column("mode", "mode", 5), Column("impl", "impl", 8),
            Column("ms", "ms", 10, ".1f"), Column("min_ms", "min", 10, ".1f"), Column("vs_peer", "peft/fp", 7, ".3f"),
            Column("paired_ratio", "paired", 6, ".3f"), Column("paired_lo", "lo", 6, ".3f"),
            Column("paired_hi", "hi", 6, ".3f"),
            Column("rel_err", "rel_err", 8, ".1e"), Column("loss_err", "loss_err", 8, ".1e"), Column("note", "note", 4)]


def run_all(run: Run) -> None:
    """Every method, its rows recorded as it finishes; then the summary."""
    try:
        if importable_impls(["peft", "transformers"], {"peft": "peft", "transformers": "transformers"}, "peft",
                            run.notes, "cpu: the comparison needs") != ["peft", "transformers"]:
            return
        dims, device = run.ctx["dims"], torch.device("cpu")
        base = random_llama({**dims, "kv_heads": dims["heads"]}, dims["seq"] + 64, run.dtype, device, run.args.seed)
        ids = torch.randint(0, dims["vocab"], (dims["batch"], dims["seq"]),
                            generator=torch.Generator().manual_seed(run.args.seed))
        table = run.table(columns())
        for method in run.ctx["methods"]:
            run.record("rows", run_method(run, method, base, dims, ids), table)
        run.payload["summary"] = summary(run.payload["rows"])
        run.payload["verdict"] = verdicts([r for r in run.payload["rows"] if r["impl"] == "fastpeft"])
        run.write()
    finally:
        torch.set_num_threads(run.ctx["previous_threads"])


def summary(flat: list[dict]) -> dict:
    """method -> mode -> ms(peft) / ms(fastpeft)."""
    out: dict = {}
    for r in flat:
        if r["impl"] == "fastpeft":
            out.setdefault(r["method"], {})[r["mode"]] = r.get("vs_peer")
    return out


def report(run: Run) -> None:
    """The table: PEFT's time over fastpeft's, method by mode, and the worst entry."""
    flat = [r for r in run.payload.get("rows") or [] if r["impl"] == "fastpeft"]
    if not flat:
        return
    print()
    print_pivot(flat, row_keys=("method",), col_key="mode", value_key="vs_peer", fmt=".3f",
                title=f"PEFT / fastpeft, median time ({run.ctx['threads']} threads; > 1: fastpeft faster):")
    ratios = [(r["vs_peer"], r["method"], r["mode"]) for r in flat if r.get("vs_peer") is not None]
    if ratios:
        worst = min(ratios)
        print(f"worst: {worst[1]} {worst[2]} {worst[0]:.3f}; {sum(v >= 1.0 for v, _, _ in ratios)}/{len(ratios)} "
              "entries >= 1.0")
    verdict = run.payload["verdict"]
    print("beyond noise (the paired ratio's ~95 % interval): slower: " + (", ".join(verdict["slower"]) or "none")
          + "; faster: " + (", ".join(verdict["faster"]) or "none") + f"; {len(verdict['parity'])} at parity")


def verdicts(flat: list[dict]) -> dict:
    """"method mode" entries whose paired-ratio interval lies below 1 (slower), above 1 (faster), or contains it."""
    out: dict = {"slower": [], "faster": [], "parity": []}
    for r in flat:
        lo, hi = r.get("paired_lo"), r.get("paired_hi")
        if lo is not None:
            out["slower" if hi < 1.0 else "faster" if lo > 1.0 else "parity"].append(f"{r['method']} {r['mode']}")
    return out


SECTION = Section(modes=("train", "infer"), run=run_all, report=report)
FAMILY = driver.Benchmark(bench=BENCH, title="CPU path vs PEFT", doc=__doc__, impls=IMPLS, modes=MODES,
                          modes_help="train,infer (default: both)", sections=(SECTION,), prepare=prepare,
                          plot=lambda run: None, options=options)


def main(argv=None) -> int:
    return driver.main(FAMILY, argv)
