"""The prefix-attention model section (--modes step, in the default run; alone with --modes step): one
prefix-tuning training step of a random LlamaForCausalLM (SDPA attention): zero_grad, forward with labels = the
input ids, loss.backward(), an AdamW step on the trainable parameters, the same batch (B = --model-tokens // L,
default 8192 tokens) for every impl. CUDA: Llama-7B layer dims (hidden 4096, 32 heads, intermediate 11008, vocab
32000) with 4 layers instead of 32 (the base plus the floor's and the two adapters' copies fit one GPU; the
attention share per layer is the 7B model's), bf16, L in {512, 2048}, P in {10, 30, 100}; quick/CPU: hidden 64,
2 layers, 4 heads, vocab 128, fp32.
Prefix kinds: flat (fastpeft flat=True; PEFT prefix_projection=False) and mlp (bottleneck 512: fastpeft's
reparameterisation; PEFT prefix_projection=True, encoder_hidden_size 512); fastpeft with shift_positions=True,
i.e. PEFT's positions, so that both compute the same function. Implementations:
    floor     the base model without any adapter: the input embeddings are a leaf that requires grad, so the
              backward runs through every layer as prefix tuning's does, and the final norm's weight is the one
              trainable parameter (a tiny AdamW step). It does slightly more than a prefix step needs (layer 0's
              input-side data gradients: its q/k/v projections and input norm), so the floor ratios flatter a little.
    fastpeft  fp.add_adapter(model, "p", fp.PrefixTuningConfig(...)): the prefix goes through fp.ops.prefix_attention
    peft      peft.get_peft_model(model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", ...)): the prefix is put
              into the KV cache, concatenated with the keys and values, masked explicitly
Columns: "x floor" = ms / ms(floor), "vs peft" = ms(peft) / ms (the issue's target: fastpeft >= 1.3), TFLOP/s of
the useful flops (model_step_flops), "%mm" = that / the measured matmul peak. Check, once per case before the
timing: PEFT's prefix is copied into fastpeft's (the same (P, layers, 2, H_kv, D) layout), then both losses on the
batch ("loss", "loss_err": |fastpeft - peft| / |peft|) and the prefix gradients ("grad_err"). The JSON holds these
rows in "model" (the op rows stay in "rows"), the section's settings in "model_config", the target in
"model_summary".
"""
from __future__ import annotations

import argparse
import copy

import torch

from ..checks import max_rel_err, tolerance
from ..devices import dtype_name, failure_note, free_memory
from ..driver import Run, Section
from ..models import random_llama
from ..optional import importable_impls
from ..options import add_int_options, choice_list, positive_ints
from ..report import Column, print_pivot
from ..roofline import Row, fill_metrics
from ..timing import time_ms

MODE = "step"  # one prefix-tuning training step of a Llama model
IMPLS = ("floor", "fastpeft", "peft")
PREFIX_KINDS = ("flat", "mlp")
TARGET = 1.3  # the goal: fastpeft's step at least 1.3x faster than PEFT's
DIMS = ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "tokens", "bottleneck")
FULL = {"hidden": 4096, "layers": 4, "heads": 32, "kv_heads": 32, "intermediate": 11008, "vocab": 32000,
        "tokens": 8192, "bottleneck": 512, "lengths": [512, 2048], "prefix_lengths": [10, 30, 100]}
QUICK = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 4, "intermediate": 128, "vocab": 128, "tokens": 128,
         "bottleneck": 32, "lengths": [32, 64], "prefix_lengths": [10]}


def model_step_flops(dims: dict, B: int, L: int, P: int) -> float:
    """Useful flops of one prefix-tuning step (the module docstring): forward and data-gradient backward of every
    linear layer and the LM head (4·T·weights, no weight gradients: the base is frozen), attention fwd+bwd with
    the prefix (3.5 x the forward's 4·B·H·D·(L·P + L²/2) per layer); the prefix MLP and the optimizer are left out
    (under 0.1% at these sizes). The floor: P = 0."""
    h, n, H, Hkv, I, V = (dims[k] for k in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab"))
    D = h // H
    per_layer = 2 * h * H * D + 2 * h * Hkv * D + 3 * h * I  # q and o, k and v, gate/up/down
    linear = 4 * B * L * (n * per_layer + h * V)
    attention = n * 3.5 * 4 * B * H * D * (L * P + L * L / 2)
    return float(linear + attention)


def peft_prefix_model(base, P: int, kind: str, bottleneck: int):
    """PEFT prefix tuning on a copy of `base`: prefix_projection for the MLP kind, PEFT's defaults otherwise."""
    import peft

    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=kind == "mlp",
                                     encoder_hidden_size=bottleneck)
    return peft.get_peft_model(copy.deepcopy(base), config).train()


def fastpeft_prefix_model(base, P: int, kind: str, bottleneck: int):
    """fastpeft prefix tuning on a copy of `base`: flat or MLP, real tokens at positions P.. (as PEFT)."""
    import fastpeft as fp

    model = copy.deepcopy(base)
    fp.add_adapter(model, "p", fp.PrefixTuningConfig(prefix_length=P, bottleneck_size=bottleneck, flat=kind == "flat",
                                                     shift_positions=True))
    return model.train()


# fastpeft's prefix parameter (relative to its PrefixTuning) -> PEFT's (relative to its PrefixEncoder); the same
# (P, layers, 2, H_kv, D) layout, so copying makes the two models compute the same function
PREFIX_PARAMS = {"control_trans": "embedding.weight", "wte.weight": "embedding.weight",
                 "control_trans.0.weight": "transform.0.weight", "control_trans.0.bias": "transform.0.bias",
                 "control_trans.2.weight": "transform.2.weight", "control_trans.2.bias": "transform.2.bias"}


def matched_prefix_params(fast, theirs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(fastpeft parameter, PEFT parameter) pairs of the two models' prefixes."""
    ours = dict(fast.model.prefix_tuning.prefix_tunings["p"]["self_prefix"].named_parameters())
    peer = dict(theirs.prompt_encoder["default"].named_parameters())
    pairs = [(p, peer[PREFIX_PARAMS[name]]) for name, p in ours.items()]
    if not pairs or any(a.numel() != b.numel() for a, b in pairs):
        raise RuntimeError(f"prefix parameters do not match: {sorted(ours)} vs {sorted(peer)}")
    return pairs


def copy_prefix(fast, theirs) -> None:
    """Load PEFT's prefix into fastpeft's (the same prefix in both models)."""
    with torch.no_grad():
        for ours, peer in matched_prefix_params(fast, theirs):
            ours.copy_(peer.reshape(ours.shape))


def model_steps(models: dict, ids: torch.Tensor, lr: float = 1e-4) -> dict:
    """impl -> (step callable, loss-only callable) for the same batch `ids` (labels = ids).

    fastpeft/peft: forward, loss, backward, AdamW step on their prefix parameters. floor: the same model with no
    adapter: the input embeddings are a leaf that requires grad (so the backward runs through every layer as in
    prefix tuning) and the final norm's weight is the one trainable parameter (a tiny AdamW step)."""
    out = {}
    for impl, model in models.items():
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr)

        def loss_of(model=model, impl=impl):
            if impl == "floor":
                embeds = model.get_input_embeddings()(ids).requires_grad_()
                return model(inputs_embeds=embeds, labels=ids, use_cache=False).loss
            return model(input_ids=ids, labels=ids, use_cache=False).loss

        def step(opt=opt, loss_of=loss_of):
            opt.zero_grad(set_to_none=True)
            loss = loss_of()
            loss.backward()
            opt.step()
            return loss

        out[impl] = (step, loss_of)
    return out


def check_prefix_models(fast, theirs, ids: torch.Tensor) -> dict:
    """With equal prefixes: the losses (and their relative difference, PEFT's as the reference), and the largest
    relative difference of the prefix gradients."""
    losses = {}
    for impl, model in (("fastpeft", fast), ("peft", theirs)):
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        losses[impl] = float(loss.detach())
    pairs = matched_prefix_params(fast, theirs)
    grads = [(a.grad.double().reshape(-1), b.grad.double().reshape(-1)) for a, b in pairs]
    fast.zero_grad(set_to_none=True)
    theirs.zero_grad(set_to_none=True)
    loss_err = abs(losses["fastpeft"] - losses["peft"]) / max(abs(losses["peft"]), 1e-30)
    return {"losses": losses, "loss_rel_err": loss_err,
            "grad_rel_err": max_rel_err([a for a, _ in grads], [b for _, b in grads])}


def run_model_case(run: Run, model: dict, L: int, P: int, kind: str) -> list[Row]:
    """One (L, P, prefix kind): build the fastpeft and PEFT models on the shared base, give them the same prefix,
    check the losses, then time one training step of the floor, fastpeft and PEFT on the same batch. `model`: the
    section's dims, impls, base model and floor model."""
    args, device, dtype, dims, impls = run.args, run.device, run.dtype, model["dims"], model["impls"]
    B = max(1, dims["tokens"] // L)
    case = {"L": L, "P": P, "B": B, "prefix": kind, "layers": dims["layers"], "hidden": dims["hidden"],
            "dtype": dtype_name(dtype)}
    limit = tolerance(dtype)
    rows, models, check, note_all = [], {}, None, ""
    generator = torch.Generator().manual_seed(args.seed + L)
    ids = torch.randint(0, dims["vocab"], (B, L), generator=generator).to(device)

    def new_row(impl, ms=None, note="", extra=None):
        flops = model_step_flops(dims, B, L, 0 if impl == "floor" else P)
        return Row(run.family.bench, case, MODE, impl, ms, flops, 0.0, note=note, extra=extra or {})

    try:
        models["floor"] = model["floor"]
        if "fastpeft" in impls:
            models["fastpeft"] = fastpeft_prefix_model(model["base"], P, kind, dims["bottleneck"])
        if "peft" in impls:
            models["peft"] = peft_prefix_model(model["base"], P, kind, dims["bottleneck"])
        if "fastpeft" in models and "peft" in models:
            copy_prefix(models["fastpeft"], models["peft"])
            if not args.no_check:
                check = check_prefix_models(models["fastpeft"], models["peft"], ids)
                if not check["loss_rel_err"] <= limit:
                    print(f"  WARNING: step {case}: fastpeft vs peft loss rel_err {check['loss_rel_err']:.2e} "
                          f"exceeds {limit}", flush=True)
    except Exception as exc:
        note_all = failure_note(exc, " building")
        print(f"  step {case}: {note_all}", flush=True)
        models = {k: v for k, v in models.items() if k == "floor"}
        free_memory(device)
    steps = model_steps(models, ids)
    for impl in impls:
        extra = {"trainable_params": sum(p.numel() for p in models[impl].parameters() if p.requires_grad)
                 if impl in models else None}
        if impl in ("fastpeft", "peft") and check is not None:
            extra.update(loss=check["losses"][impl], loss_rel_err=check["loss_rel_err"],
                         grad_rel_err=check["grad_rel_err"])
        ms, note = None, note_all if impl != "floor" else ""
        if impl in steps:
            try:
                with torch.enable_grad():
                    ms = time_ms(steps[impl][0], device, run.timer)
            except Exception as exc:
                note = failure_note(exc)
                print(f"  {impl} step {case}: {note}", flush=True)
                free_memory(device)
        if impl != "floor" and check is not None and not check["loss_rel_err"] <= limit:
            note = (note + " MISMATCH").strip()
        rows.append(new_row(impl, ms, note, extra))
    for built in (models.get("fastpeft"), models.get("peft")):
        if built is not None:
            built.zero_grad(set_to_none=True)
    model["floor"].zero_grad(set_to_none=True)
    del models, steps
    free_memory(device)
    fill_metrics(rows, None, base="floor", peer="peft")
    for row in rows:
        row.rel_err = row.extra.get("loss_rel_err")
        row.extra["ratio_to_floor"] = row.vs_base
        row.extra["speedup_over_peft"] = row.vs_peer
        row.extra["mfu_pct"] = None if row.tflops is None else 100.0 * row.tflops / run.peaks.matmul_tflops
    return rows


def model_columns() -> list[Column]:
    return [Column("L", "L", 5), Column("P", "P", 4), Column("B", "B", 4), Column("prefix", "prefix", 6),
            Column("impl", "impl", 8), Column("ms", "ms", 10, ".3f"), Column("vs_base", "x floor", 7, ".3f"),
            Column("vs_peer", "vs peft", 7, ".2f"), Column("tflops", "TFLOP/s", 8, ".2f"),
            Column("mfu_pct", "%mm", 5, ".1f"), Column("loss", "loss", 8, ".4f"),
            Column("rel_err", "loss_err", 8, ".1e"), Column("grad_rel_err", "grad_err", 8, ".1e"),
            Column("note", "note", 4)]


def model_summary(flat: list[dict]) -> dict:
    """How many cases meet fastpeft's step >= 1.3x faster than PEFT's, and the worst case."""
    rows = [r for r in flat if r["impl"] == "fastpeft" and r.get("vs_peer") is not None]
    if not rows:
        return {}
    worst = min(rows, key=lambda r: r["vs_peer"])
    return {"target": f"ms(peft) / ms(fastpeft) >= {TARGET}",
            "met": sum(r["vs_peer"] >= TARGET for r in rows),
            "cases": len(rows), "worst": {k: worst[k] for k in ("L", "P", "prefix", "vs_peer", "vs_base")}}


def run_step(run: Run) -> None:
    """Every (L, P, prefix kind) of the model section, printed and written as "model" rows of the JSON."""
    args, device, dtype = run.args, run.device, run.dtype
    preset = QUICK if run.quick else FULL
    dims = {k: preset[k] for k in DIMS}
    for k in ("layers", "tokens"):
        dims[k] = getattr(args, f"model_{k}") or dims[k]
    lengths, prefixes = args.model_lengths or preset["lengths"], args.model_prefix_lengths or preset["prefix_lengths"]
    kinds = args.prefix_kinds
    impls = importable_impls([i for i in IMPLS if i in args.impls or i == "floor"],
                             {"fastpeft": "fastpeft", "peft": "peft", "floor": "transformers"}, "floor", run.notes,
                             "model step")
    if impls is None:
        return
    run.payload["model_config"] = {
        "model": "LlamaForCausalLM, random weights" + ("" if run.quick else
                                                       f" with Llama-7B layer dims, {dims['layers']} layers "
                                                       f"(of 32: fits one GPU beside the copies)"),
        **dims, "lengths": lengths, "prefix_lengths": prefixes, "prefix_kinds": kinds, "batch": "tokens // L",
        "dtype": dtype_name(dtype), "impls": impls, "attention": "sdpa", "optimizer": "torch.optim.AdamW(lr=1e-4)",
        "step": "zero_grad, forward with labels = input ids, loss.backward(), AdamW step on the trainable parameters",
        "fastpeft": "fp.PrefixTuningConfig(prefix_length=P, flat=(kind == 'flat'), bottleneck_size, "
                    "shift_positions=True)",
        "peft": "peft.PrefixTuningConfig(task_type='CAUSAL_LM', num_virtual_tokens=P, "
                "prefix_projection=(kind == 'mlp'), encoder_hidden_size=bottleneck_size)",
        "floor": "the base model, no adapter: input embeddings a leaf requiring grad (the backward runs through "
                 "every layer), final norm weight the only trainable parameter",
        "check": "PEFT's prefix copied into fastpeft's (same layout), then loss and prefix-gradient rel_err",
        "target": f"ms(peft) / ms(fastpeft) >= {TARGET}"}
    print(f"\nModel step: Llama, hidden {dims['hidden']}, {dims['layers']} layers, heads {dims['heads']}, "
          f"intermediate {dims['intermediate']}, vocab {dims['vocab']}, {dtype_name(dtype)}; L {lengths}; "
          f"P {prefixes}; B = {dims['tokens']} // L; prefix {kinds}; impls {impls}", flush=True)
    max_positions = max(lengths) + max(prefixes)
    try:
        base = random_llama(dims, max_positions, dtype, device, args.seed).train()
        floor = copy.deepcopy(base)
        floor.model.norm.weight.requires_grad_(True)
    except Exception as exc:
        run.note(f"model step skipped: building the model failed: {type(exc).__name__}: {str(exc)[:160]}")
        free_memory(device)
        return
    model = {"dims": dims, "impls": impls, "base": base, "floor": floor}
    table = run.table(model_columns())
    for L in lengths:
        for P in prefixes:
            for kind in kinds:
                run.record("model", run_model_case(run, model, L, P, kind), table)
    del base, floor, model
    free_memory(device)
    run.payload["model_summary"] = model_summary(run.payload["model"])
    run.write()


def report_step(run: Run) -> None:
    """The model section's pivots (speed-up over PEFT, ratios to the floor) and its target line."""
    flat = run.payload.get("model") or []
    pivots = [("fastpeft", "vs_peer", "step: fastpeft speed-up over PEFT (peft ms / fastpeft ms), by L:", ".2f"),
              ("fastpeft", "vs_base", "step: fastpeft time / floor time (no adapter), by L:", ".3f"),
              ("peft", "vs_base", "step: PEFT time / floor time (no adapter), by L:", ".3f")]
    for impl, key, title, fmt in pivots:
        rows = [r for r in flat if r["impl"] == impl]
        if rows and any(r.get(key) is not None for r in rows):
            print()
            print_pivot(rows, row_keys=("prefix", "P"), col_key="L", value_key=key, title=title, fmt=fmt)
    s = run.payload.get("model_summary")
    if s:
        w = s["worst"]
        print(f"target step: fastpeft's step >= {TARGET}x faster than PEFT's in {s['met']}/{s['cases']} cases; "
              f"worst L={w['L']} P={w['P']} {w['prefix']}: {w['vs_peer']:.2f}x")
    errs = [r["rel_err"] for r in flat if r["impl"] == "fastpeft" and r.get("rel_err") is not None]
    if errs:
        print(f"check step: fastpeft vs PEFT loss with equal prefixes, max rel_err {max(errs):.1e}")


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-lengths", type=positive_ints, help="step: sequence lengths (default 512,2048)")
    p.add_argument("--model-prefix-lengths", type=positive_ints, help="step: prefix lengths (default 10,30,100)")
    add_int_options(p, {"--model-tokens": "step: tokens per batch B·L (default 8192, quick 128)",
                        "--model-layers": "step: Llama layers (default 4, quick 2)"})
    p.add_argument("--prefix-kinds", type=choice_list(PREFIX_KINDS, "prefix kinds"), default=list(PREFIX_KINDS),
                   help="step: flat and/or mlp (PEFT prefix_projection False/True; default both)")


SECTION = Section(modes=(MODE,), run=run_step, report=report_step, options=options)
