"""The training-step section: one step of a random Llama-shaped model (~1.1B parameters on the GPU: hidden 2048,
16 layers, 32 heads over 8 key/value heads, intermediate 8192, vocab 32000; bf16; batch 4 x 512 tokens) with LoRA
r = 16, alpha 32, on q, k, v, o, gate, up and down: fastpeft under each strategy pin against PEFT, and the model
without adapters (the floor).

    step  zero_grad, forward with labels = the input ids, loss.backward(), AdamW on the trainable parameters
          (prefix_attention/step.py's model_steps; its floor: the input embeddings a leaf that requires grad and
          the final norm the one trainable parameter, so the backward runs through every layer)
Parity, checked before any timing: PEFT's LoRA is made with init_lora_weights=False (B non-zero, so A gets a real
gradient), saved with save_pretrained and loaded into fastpeft with fp.load_adapter: both start from the same A and
B. Then one forward and backward each on the same batch: the loss, the gradient norm ‖g‖ = sqrt(Σ_θ ‖∂L/∂θ‖²) over
the trainable parameters, and the largest relative Frobenius error of the per-tensor gradients (PEFT's the
reference); a loss or norm further than the dtype's tolerance marks the row MISMATCH.
Figures: tokens/s = B·L / step time; step memory = torch.cuda.max_memory_allocated() during one step less what was
allocated before it (activations, gradients, optimizer state; "peak_bytes" is the peak itself, with every model
of the section resident). FLOPs: step.model_step_flops without a prefix
(4·tokens·weights of the frozen linears and the LM head; attention 3.5 x 4·B·H·D·L²/2 per layer; LoRA's own terms,
under 1% at r = 16, left out).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import tempfile

import torch

from ..checks import max_rel_err, tolerance
from ..devices import dtype_name, failure_note, free_memory, synchronize
from ..models import random_llama
from ..prefix_attention.step import model_step_flops, model_steps
from ..report import Column, TablePrinter
from ..roofline import Row, fill_metrics
from ..timing import time_ms
from .context import STRATEGIES, Check
from .plan import Guard

IMPLS = ("base", *STRATEGIES, "peft")
SECTION = "train_step"


def lora_models(base, plan: dict, directory: str):
    """(fastpeft model, PEFT model), copies of `base` holding the same LoRA adapter (PEFT's, saved and loaded)."""
    import peft

    import fastpeft as fp

    config = peft.LoraConfig(r=plan["r"], lora_alpha=plan["alpha"], lora_dropout=0.0,
                             target_modules=list(plan["targets"]), init_lora_weights=False)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), config).train()
    theirs.save_pretrained(directory)
    fast = fp.load_adapter(copy.deepcopy(base), directory).train()
    return fast, theirs


def _key(name: str) -> str:
    """A LoRA parameter's name without PEFT's wrapper prefix and Linear suffix: the same key in both models."""
    return name.removeprefix("base_model.model.").removesuffix(".weight")


def loss_and_grads(model, ids: torch.Tensor, context) -> tuple[float, float, dict]:
    """(loss, ‖g‖, {key: gradient}) of one forward and backward; the gradients are then cleared."""
    model.zero_grad(set_to_none=True)
    with context:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
    grads = {_key(n): p.grad.detach().float().clone() for n, p in model.named_parameters()
             if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))
    return float(loss.detach()), norm, grads


def parity(check: Check, fast, theirs, ids) -> tuple[dict, dict]:
    """({impl: loss, ‖g‖ and their relative errors against PEFT's model run in float32 (loss_err, grad_norm_err,
    grad_err: the largest per-tensor error), and for the strategies the differences from PEFT's bf16 figures},
    the float32 reference's loss and ‖g‖). Every model starts from the same adapter; nothing is stepped here."""
    reference = copy.deepcopy(theirs).float()
    loss0, norm0, ref = loss_and_grads(reference, ids, contextlib.nullcontext())
    del reference
    free_memory(check.device)
    out = {}
    runs = [("peft", theirs, contextlib.nullcontext)]
    runs += [(strategy, fast, functools.partial(check.pinned, strategy)) for strategy in STRATEGIES]
    for impl, model, context in runs:
        with check.dispatch():
            loss, norm, grads = loss_and_grads(model, ids, context())
        shared = sorted(set(grads) & set(ref))
        if len(shared) != len(ref) or len(shared) != len(grads):
            check.note(f"{SECTION}: {impl}: {len(shared)} gradients matched by name of {len(grads)} and {len(ref)} "
                       f"(float32 reference), e.g. {sorted(set(grads) ^ set(ref))[:2]}")
        out[impl] = {"loss": loss, "grad_norm": norm, "loss_err": abs(loss - loss0) / max(abs(loss0), 1e-30),
                     "grad_norm_err": abs(norm - norm0) / max(norm0, 1e-30), "grads_compared": len(shared),
                     "grad_err": max_rel_err([grads[k] for k in shared], [ref[k] for k in shared]) if shared else None}
    peft = out["peft"]
    for strategy in STRATEGIES:
        out[strategy]["loss_vs_peft"] = abs(out[strategy]["loss"] - peft["loss"]) / max(abs(peft["loss"]), 1e-30)
        out[strategy]["grad_norm_vs_peft"] = abs(out[strategy]["grad_norm"] - peft["grad_norm"]) / max(
            peft["grad_norm"], 1e-30)
    return out, {"loss": loss0, "grad_norm": norm0}


def mismatch(errors: dict, peft: dict, limit: float) -> bool:
    """A strategy's loss, ‖g‖ or per-tensor gradient further from float32 than both 2x PEFT's own error (the
    tolerance rule of DESIGN.md) and the dtype's tolerance."""
    return any(not (errors.get(k) is not None and errors[k] <= max(2.0 * (peft.get(k) or 0.0), limit))
               for k in ("loss_err", "grad_norm_err", "grad_err"))


def step_memory(fn, device: torch.device) -> tuple[int | None, int | None]:
    """(peak bytes allocated during one call of fn beyond what was allocated before it, the peak itself: every
    model of the section resident); CUDA only."""
    if device.type != "cuda":
        return None, None
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return peak - before, peak


def columns() -> list[Column]:
    return [Column("impl", "impl", 8), Column("ms", "ms", 9, ".2f"), Column("tokens_per_s", "tokens/s", 10, ".0f"),
            Column("step_mib", "step MiB", 9, ".0f"), Column("vs_base", "x base", 7, ".3f"),
            Column("vs_peer", "vs peft", 7, ".2f"), Column("loss", "loss", 8, ".4f"),
            Column("loss_err", "loss_err", 8, ".1e"), Column("grad_norm", "|g|", 9, ".4g"),
            Column("grad_norm_err", "|g|_err", 8, ".1e"), Column("grad_err", "grad_err", 8, ".1e"),
            Column("note", "note", 4)]


def run_train(check: Check) -> None:
    plan, device, dtype = check.plan.train, check.device, check.dtype
    guard = Guard(check.budget, SECTION)
    B, L = plan["batch"], plan["seq"]
    dims = {k: plan[k] for k in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab")}
    print(f"\n== {SECTION}: Llama {dims}, B {B} x L {L}, LoRA r {plan['r']}; {guard.allowed_s:.0f} s allowed ==",
          flush=True)
    entry = check.section(SECTION, {**plan, "impls": list(IMPLS), "dtype": dtype_name(dtype), "optimizer": "AdamW",
                                    "adapter": "PEFT's init_lora_weights=False adapter, loaded into fastpeft"})
    case = {"model": "llama", **dims, "B": B, "L": L, "tokens": B * L, "r": plan["r"], "dtype": dtype_name(dtype)}
    flops = model_step_flops(dims, B, L, 0)
    if guard.allowed_s < plan["min_s"]:  # building and checking the models alone takes about this long
        guard.skip("the whole section")
        entry["guard"] = guard.record()
        check.write()
        return
    try:
        base = random_llama(dims, L, dtype, device, seed=0).train()
        with tempfile.TemporaryDirectory(prefix="fastpeft-gpu-check-") as directory:
            fast, theirs = lora_models(base, plan, directory)
        base.model.norm.weight.requires_grad_(True)  # the floor's one trainable parameter (step.model_steps)
        ids = torch.randint(0, dims["vocab"], (B, L), generator=torch.Generator().manual_seed(0)).to(device)
        checks, entry["float32_reference"] = parity(check, fast, theirs, ids)
        steps = model_steps({"floor": base, "fastpeft": fast, "peft": theirs}, ids)
    except Exception as exc:  # building or the parity check failed: recorded, the run goes on
        entry["errors"] = [failure_note(exc, " building the models")]
        check.note(f"{SECTION}: {entry['errors'][0]}")
        free_memory(device)
        entry["guard"] = guard.record()
        check.write()
        return
    calls = {"base": steps["floor"][0], "peft": steps["peft"][0]}
    for strategy in STRATEGIES:
        calls[strategy] = _pinned_call(check, strategy, steps["fastpeft"][0])
    limit = tolerance(dtype)
    timer = dataclasses.replace(check.plan.timer, rep_ms=plan["rep_ms"])  # a step is ~30 ms: ~10 timed steps
    rows, table = [], TablePrinter(columns())
    table.header()
    for impl in IMPLS:
        if guard.expired():
            guard.skip(impl)
            continue
        ms, note, (memory, peak) = None, "", (None, None)
        try:
            with torch.enable_grad():
                ms = time_ms(calls[impl], device, timer)
                memory, peak = step_memory(calls[impl], device)
        except Exception as exc:
            note = failure_note(exc)
            free_memory(device)
        extra = {"tokens_per_s": B * L / (ms * 1e-3) if ms else None, "step_bytes": memory, "peak_bytes": peak,
                 "step_mib": memory / 2**20 if memory is not None else None, **checks.get(impl, {})}
        if impl in STRATEGIES and mismatch(extra, checks["peft"], limit):
            note = (note + " MISMATCH").strip()
        rows.append(Row(SECTION, case, "step", impl, ms, flops, 0.0, note=note, extra=extra))
    fill_metrics(rows, None, base="base", peer="peft")
    for row in rows:
        row.extra["mfu_pct"] = (100.0 * row.tflops / check.peaks.matmul_tflops
                                if row.tflops is not None and check.peaks else None)
    check.record(SECTION, rows, table)
    del base, fast, theirs, steps, calls
    free_memory(device)
    entry["guard"] = guard.record()
    check.write()


def _pinned_call(check: Check, strategy: str, step):
    def call():
        with check.dispatch(), check.pinned(strategy):
            return step()
    return call
