"""LoRA on a 4-bit base against PEFT's QLoRA and against LoRA on the bf16 base: one training step (forward with
labels, backward, AdamW) and one inference forward of a random Llama, timed in alternating runs in one process,
with the memory of each: the model's parameters and buffers, and the peak of what one step allocates on top.

    fastpeft bench qlora --no-quick      # hidden 1024, 4 layers, LoRA r16 on all linears, 4 x 256 and 1 x 64
                                         # tokens (the default with CUDA; about a minute on 2 CPU cores)
    fastpeft bench qlora --quick         # a tiny model, seconds (the default without CUDA)
    fastpeft bench qlora --tokens 1x64   # one shape (batch x seq)

Implementations: fastpeft-nf4 (fp.prepare_for_kbit_training + fp.add_adapter on a bitsandbytes NF4 base, double
quantization, bf16 compute), on CUDA as its two strategies (fastpeft/ops/lora_4bit.py): fastpeft-nf4-fused (the
4-bit weight read inside the GEMM) and fastpeft-nf4-cublas (bitsandbytes dequantizes, then cuBLAS); on the CPU the
layer's own bitsandbytes product plus the term (the strategies are CUDA's); peft-nf4 (PEFT's prepare_model_for_kbit_training + get_peft_model on the same base, loaded again), fastpeft-bf16
(fastpeft's LoRA on the bf16 base); rel_err: fastpeft-nf4's logits against PEFT's. No gradient checkpointing
anywhere, so that the three hold the same activations (the k-bit preparation's other changes, float32 norms, apply
to the NF4 models as in the recipe). PEFT's adapter is copied into both fastpeft models, so all three compute the
same adapter (the bf16 base's logits differ by the quantization error). Memory: on CUDA, torch's peak allocated
bytes during the step above the bytes before it; on the CPU, the peak of the allocations live during the step
from the profiler's memory events (the process's high-water mark would count loading: a 4-bit model is first
loaded in bf16). The 4-bit base saves memory where the weights dominate (few tokens); with many tokens the
activations and bitsandbytes' transient dequantized copies can outweigh it, which the table shows.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile

import torch

from . import driver
from .alternating import CLOCKS, alternate, steps
from .checks import max_rel_err
from .devices import failure_note
from .driver import Run, Section
from .optional import importable_impls
from .options import add_int_options
from .report import Column, print_pivot
from .roofline import Row, fill_metrics

BENCH = "qlora"
IMPLS = ("fastpeft-nf4-fused", "fastpeft-nf4-cublas", "fastpeft-nf4", "peft-nf4", "fastpeft-bf16")
STRATEGIES = {"fastpeft-nf4-fused": "fused", "fastpeft-nf4-cublas": "cublas"}  # CUDA: fastpeft-nf4 pinned to each
MODES = {"train": "train", "training": "train", "infer": "infer", "inference": "infer", "forward": "infer"}
DIMS = ("hidden", "layers", "heads", "intermediate", "vocab", "reps", "rank")
FULL = {"hidden": 1024, "layers": 4, "heads": 8, "intermediate": 2816, "vocab": 4096, "reps": 5, "rank": 16}
QUICK = {"hidden": 64, "layers": 2, "heads": 4, "intermediate": 128, "vocab": 128, "reps": 2, "rank": 4}
TOKENS = {"full": ["4x256", "1x64", "16x1"], "quick": ["2x16"]}  # 16x1: one decode step's 16 tokens (no cache)


def impls_here(device: torch.device, chosen) -> list[str]:
    """The implementations that run on `device`: the two strategies where fastpeft's 4-bit op runs (CUDA, or the
    Triton interpreter when the backend is forced), the layer's own bitsandbytes product elsewhere."""
    from ..ops.lora_4bit import path

    strategies = path(device, torch.bfloat16, 1) != "torch"
    return [i for i in chosen if (i in STRATEGIES) == strategies or i not in (*STRATEGIES, "fastpeft-nf4")]


def pinned(fn, strategy: str | None):
    """fn run with fastpeft's 4-bit strategy pinned (None: the strategy table's choice)."""
    from ..ops import use_kernel_options

    def call():
        with use_kernel_options(linear_strategy=strategy):
            return fn()
    return call


def _load(folder: str, device: torch.device, nf4: bool):
    import transformers

    quantization = {"quantization_config": transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16)} if nf4 else {}
    return transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map=str(device),
                                                         **quantization)


def build(folder: str, device: torch.device, rank: int) -> dict:
    """impl -> model: PEFT's QLoRA, and fastpeft's LoRA on the NF4 and the bf16 base, all with PEFT's adapter."""
    import peft

    import fastpeft as fp

    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(peft.prepare_model_for_kbit_training(_load(folder, device, True),
                                                                      use_gradient_checkpointing=False), config)
    with tempfile.TemporaryDirectory() as adapter:
        theirs.save_pretrained(adapter)
        nf4 = fp.load_adapter(fp.prepare_for_kbit_training(_load(folder, device, True),
                                                           use_gradient_checkpointing=False), adapter)
        bf16 = fp.load_adapter(_load(folder, device, False), adapter)
    return {"fastpeft-nf4": nf4, "peft-nf4": theirs, "fastpeft-bf16": bf16}


def _mib(n: float) -> float:
    return n / 2**20


def weights_mib(model) -> float:
    """Parameters and buffers, as stored (packed 4-bit weights at their packed size)."""
    return _mib(sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]))


def step_peak_mib(fn, device: torch.device) -> float:
    """The peak of the bytes one call of `fn` allocates on top of those live before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return _mib(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return _mib(peak)


def run_shape(run: Run, folder: str, tokens: str) -> list[Row]:
    batch, seq = (int(v) for v in tokens.split("x"))
    dims, device = run.ctx["dims"], run.device
    ids = torch.randint(0, dims["vocab"], (batch, seq), generator=torch.Generator().manual_seed(run.args.seed)
                        ).to(device)
    case = {"tokens": tokens}
    rows, note = [], ""
    try:
        models = build(folder, device, dims["rank"])
    except Exception as exc:
        models, note = {}, failure_note(exc, " building")
        print(f"  {tokens}: {note}", flush=True)
    impls = impls_here(device, run.impls)
    fns = steps(models, ids)
    for impl, strategy in STRATEGIES.items():  # one fastpeft NF4 model, its strategy pinned per call
        if models and impl in impls:
            models[impl] = models["fastpeft-nf4"]
            fns[impl] = {mode: pinned(fn, strategy) for mode, fn in fns["fastpeft-nf4"].items()}
    checks = {}
    if models:  # fastpeft's NF4 model computes PEFT's logits (the same base, the same adapter)
        with torch.no_grad():
            theirs = models["peft-nf4"].eval()(input_ids=ids).logits.float()
            for impl in (i for i in impls if i.startswith("fastpeft-nf4")):
                ours = pinned(lambda m=models[impl].eval(): m(input_ids=ids).logits.float(), STRATEGIES.get(impl))
                checks[impl] = max_rel_err([ours()], [theirs])
    for mode in run.ctx["modes"]:
        times, memory = {}, {}
        for model in models.values():
            model.train(mode == "train")
        if models:
            try:
                times = alternate({impl: fns[impl][mode] for impl in impls}, dims["reps"], CLOCKS["wall"], device)
                memory = {impl: step_peak_mib(fns[impl][mode], device) for impl in impls}
            except Exception as exc:
                note = failure_note(exc)
                print(f"  {tokens} {mode}: {note}", flush=True)
        for impl in impls:
            t = times.get(impl)
            extra = {"times_ms": t or [], "weights_mib": weights_mib(models[impl]) if impl in models else None,
                     "step_peak_mib": memory.get(impl)}
            rows.append(Row(BENCH, case, mode, impl, statistics.median(t) if t else None, 0.0, 0.0,
                            rel_err=checks.get(impl), note=note, extra=extra))
    fill_metrics(rows, None, base="peft-nf4", peer="peft-nf4")
    return rows


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", default=None, help="batch x seq shapes, comma-separated (default: full 4x256,1x64; "
                                                  "quick 2x16)")
    add_int_options(p, {f"--{k}": f"model/run size (full {FULL[k]}, quick {QUICK[k]})" for k in DIMS})


def prepare(run: Run) -> tuple[str, dict]:
    preset = QUICK if run.quick else FULL
    dims = {k: getattr(run.args, k) or preset[k] for k in DIMS}
    tokens = run.args.tokens.split(",") if run.args.tokens else TOKENS["quick" if run.quick else "full"]
    run.ctx.update(dims=dims, tokens=tokens, modes=[m for m in ("train", "infer") if m in run.args.modes])
    config = {**dims, "tokens": tokens, "modes": run.ctx["modes"], "model": "LlamaForCausalLM, random weights",
              "quantization": "bitsandbytes NF4, double quantization, bf16 compute", "lora": "all-linear, alpha 2r",
              "memory": "weights_mib: parameters + buffers; step_peak_mib: peak bytes allocated during one step on "
                        "top of those live before it (CUDA: torch's peak; CPU: the profiler's memory events)",
              "ratio": "ms(peft-nf4) / ms(impl)"}
    banner = (f"Llama hidden {dims['hidden']}, {dims['layers']} layers, LoRA r{dims['rank']} all-linear, tokens "
              f"{','.join(tokens)}, {dims['reps']} repetitions")
    return banner, {"config": config}


def columns() -> list[Column]:
    return [Column("tokens", "tokens", 7), Column("mode", "mode", 5), Column("impl", "impl", 13),
            Column("ms", "ms", 9, ".1f"), Column("vs_peer", "peft/x", 7, ".3f"),
            Column("weights_mib", "weights MiB", 11, ".1f"), Column("step_peak_mib", "step MiB", 9, ".1f"),
            Column("rel_err", "rel_err", 8, ".1e"), Column("note", "note", 4)]


def run_all(run: Run) -> None:
    if importable_impls(["peft", "transformers", "bitsandbytes"], {"peft": "peft", "transformers": "transformers",
                                                                   "bitsandbytes": "bitsandbytes"},
                        "peft", run.notes, "qlora: the comparison needs") != ["peft", "transformers", "bitsandbytes"]:
        return
    from .models import random_llama

    dims = run.ctx["dims"]
    table = run.table(columns())
    with tempfile.TemporaryDirectory() as folder:
        random_llama({**dims, "kv_heads": dims["heads"]}, 512, torch.bfloat16, torch.device("cpu"),
                     run.args.seed).save_pretrained(folder)
        for tokens in run.ctx["tokens"]:
            run.record("rows", run_shape(run, folder, tokens), table)
    run.write()


def report(run: Run) -> None:
    rows = run.payload.get("rows") or []
    if not rows:
        return
    print()
    print_pivot(rows, row_keys=("tokens", "mode"), col_key="impl", value_key="vs_peer", fmt=".3f",
                title="PEFT's NF4 time / each implementation's (> 1: faster than PEFT's QLoRA):")
    print_pivot(rows, row_keys=("tokens", "mode"), col_key="impl", value_key="step_peak_mib", fmt=".1f",
                title="peak MiB one step allocates (weights MiB in the table above):")


SECTION = Section(modes=("train", "infer"), run=run_all, report=report)
FAMILY = driver.Benchmark(bench=BENCH, title="LoRA on a 4-bit base (QLoRA)", doc=__doc__, impls=IMPLS, modes=MODES,
                          modes_help="train,infer (default: both)", sections=(SECTION,), prepare=prepare,
                          plot=lambda run: None, options=options)


def main(argv=None) -> int:
    return driver.main(FAMILY, argv)
