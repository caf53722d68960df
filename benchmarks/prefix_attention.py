"""Prefix-attention microbenchmark: torch SDPA without a prefix (the floor), fastpeft's prefix_attention and the
plain-PyTorch way (concatenate the prefix, SDPA with an explicit mask), in training and in decode.

    python benchmarks/prefix_attention.py           # CUDA: Llama-7B attention, bf16, L 512..4096, P 10/30/100
    python benchmarks/prefix_attention.py --quick   # tiny fp32 cases, D 64 (the default without CUDA)
    python benchmarks/prefix_attention.py --lengths 2048 --prefix-lengths 30 --modes fwdbwd,decode
    python benchmarks/prefix_attention.py --modes step --model-lengths 2048 --prefix-kinds mlp   # the model only
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

Model section (mode "step", in the default run; --modes step runs it alone): one prefix-tuning training step of a
random LlamaForCausalLM (SDPA attention): zero_grad, forward with labels = the input ids, loss.backward(), an
AdamW step on the trainable parameters, the same batch (B = --model-tokens // L, default 8192 tokens) for every
impl. CUDA: Llama-7B layer dims (hidden 4096, 32 heads, intermediate 11008, vocab 32000) with 4 layers instead of
32 (the base plus the floor's and the two adapters' copies fit one GPU; the attention share per layer is the 7B
model's), bf16, L in {512, 2048}, P in {10, 30, 100}; quick/CPU: hidden 64, 2 layers, 4 heads, vocab 128, fp32.
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
import copy
import importlib
import math
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

try:  # imported as benchmarks.prefix_attention (repo root on sys.path)
    from . import _driver
    from .common import (Column, InputPool, Row, TablePrinter, dtype_name, environment, fill_metrics, free_memory,
                         importable_impls, is_oom, parse_dtype, pick_device, plot_ratio_to_base, print_pivot,
                         random_llama, result_path, str_list, time_ms, write_json)
except ImportError:  # run as a script: python benchmarks/prefix_attention.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import _driver
    from benchmarks.common import (Column, InputPool, Row, TablePrinter, dtype_name, environment, fill_metrics,
                                   free_memory, importable_impls, is_oom, parse_dtype, pick_device,
                                   plot_ratio_to_base, print_pivot, random_llama, result_path, str_list, time_ms,
                                   write_json)

BENCH = "prefix_attention"
IMPLS = ("floor", "fastpeft", "torch")
MODES = ("fwd", "fwd+bwd", "decode")
TARGET_MODES = ("fwd+bwd", "decode")  # where the issue states the (L + P) / L goal
FULL = {"lengths": [512, 1024, 2048, 4096], "prefix_lengths": [10, 30, 100], "tokens": 16384, "heads": 32,
        "kv_heads": 32, "head_dim": 128}  # Llama-7B attention
QUICK = {"lengths": [32, 128], "prefix_lengths": [10, 30], "tokens": 256, "heads": 4, "kv_heads": 4, "head_dim": 64}

MODEL_MODE = "step"  # the model section: one prefix-tuning training step of a Llama model
MODEL_IMPLS = ("floor", "fastpeft", "peft")
PREFIX_KINDS = ("flat", "mlp")
ALL_IMPLS = tuple(dict.fromkeys(IMPLS + MODEL_IMPLS))
STEP_TARGET = 1.3  # the goal: fastpeft's step at least 1.3x faster than PEFT's
MODEL_DIMS = ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "tokens", "bottleneck")
MODEL_FULL = {"hidden": 4096, "layers": 4, "heads": 32, "kv_heads": 32, "intermediate": 11008, "vocab": 32000,
              "tokens": 8192, "bottleneck": 512, "lengths": [512, 2048], "prefix_lengths": [10, 30, 100]}
MODEL_QUICK = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 4, "intermediate": 128, "vocab": 128, "tokens": 128,
               "bottleneck": 32, "lengths": [32, 64], "prefix_lengths": [10]}


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
# Model level: one prefix-tuning training step of a Llama model
# ------------------------------------------------------------------------------------------------------------

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
            "grad_rel_err": _driver.max_rel_err([a for a, _ in grads], [b for _, b in grads])}


def run_model_case(mctx: dict, L: int, P: int, kind: str) -> list[Row]:
    """One (L, P, prefix kind): build the fastpeft and PEFT models on the shared base, give them the same prefix,
    check the losses, then time one training step of the floor, fastpeft and PEFT on the same batch."""
    args, device, dtype, dims, impls = mctx["args"], mctx["device"], mctx["dtype"], mctx["dims"], mctx["impls"]
    B = max(1, dims["tokens"] // L)
    case = {"L": L, "P": P, "B": B, "prefix": kind, "layers": dims["layers"], "hidden": dims["hidden"],
            "dtype": dtype_name(dtype)}
    tolerance = _driver.TOLERANCE.get(dtype, 1e-2)
    rows, models, check, note_all = [], {}, None, ""
    generator = torch.Generator().manual_seed(args.seed + L)
    ids = torch.randint(0, dims["vocab"], (B, L), generator=generator).to(device)

    def new_row(impl, ms=None, note="", extra=None):
        flops = model_step_flops(dims, B, L, 0 if impl == "floor" else P)
        return Row(BENCH, case, MODEL_MODE, impl, ms, flops, 0.0, note=note, extra=extra or {})

    try:
        models["floor"] = mctx["floor"]
        if "fastpeft" in impls:
            models["fastpeft"] = fastpeft_prefix_model(mctx["base"], P, kind, dims["bottleneck"])
        if "peft" in impls:
            models["peft"] = peft_prefix_model(mctx["base"], P, kind, dims["bottleneck"])
        if "fastpeft" in models and "peft" in models:
            copy_prefix(models["fastpeft"], models["peft"])
            if not args.no_check:
                check = check_prefix_models(models["fastpeft"], models["peft"], ids)
                if not check["loss_rel_err"] <= tolerance:
                    print(f"  WARNING: step {case}: fastpeft vs peft loss rel_err {check['loss_rel_err']:.2e} "
                          f"exceeds {tolerance}", flush=True)
    except Exception as exc:
        note_all = ("OOM" if is_oom(exc) else "error") + f" building: {type(exc).__name__}: {str(exc)[:160]}"
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
                    ms = time_ms(steps[impl][0], device, mctx["timer"])
            except Exception as exc:
                note = ("OOM" if is_oom(exc) else "error") + f": {type(exc).__name__}: {str(exc)[:160]}"
                print(f"  {impl} step {case}: {note}", flush=True)
                free_memory(device)
        if impl != "floor" and check is not None and not check["loss_rel_err"] <= tolerance:
            note = (note + " MISMATCH").strip()
        rows.append(new_row(impl, ms, note, extra))
    for model in (models.get("fastpeft"), models.get("peft")):
        if model is not None:
            model.zero_grad(set_to_none=True)
    mctx["floor"].zero_grad(set_to_none=True)
    del models, steps
    free_memory(device)
    fill_metrics(rows, None, base="floor", peer="peft")
    for row in rows:
        row.rel_err = row.extra.get("loss_rel_err")
        row.extra["ratio_to_floor"] = row.vs_base
        row.extra["speedup_over_peft"] = row.vs_peer
        row.extra["mfu_pct"] = None if row.tflops is None else 100.0 * row.tflops / mctx["peaks"].matmul_tflops
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
    return {"target": f"ms(peft) / ms(fastpeft) >= {STEP_TARGET}",
            "met": sum(r["vs_peer"] >= STEP_TARGET for r in rows),
            "cases": len(rows), "worst": {k: worst[k] for k in ("L", "P", "prefix", "vs_peer", "vs_base")}}


def _record(case_rows: list[Row], rows: list[Row], table, payload: dict, key: str, json_path) -> None:
    """Print a case's rows, add them to `rows` and payload[key], and rewrite the JSON: a cut-off run keeps what it
    measured."""
    for row in case_rows:
        table.row(row.flat())
    rows += case_rows
    payload[key] = [row.flat() for row in rows]
    write_json(json_path, payload)


def run_model_section(ctx: dict, payload: dict, json_path: Path) -> None:
    """Every (L, P, prefix kind) of the model section, printed and written as "model" rows of the JSON."""
    args, device, dtype = ctx["args"], ctx["device"], ctx["dtype"]
    preset = MODEL_QUICK if ctx["quick"] else MODEL_FULL
    dims = {k: preset[k] for k in MODEL_DIMS}
    for k in ("layers", "tokens"):
        dims[k] = getattr(args, f"model_{k}") or dims[k]
    lengths, prefixes = args.model_lengths or preset["lengths"], args.model_prefix_lengths or preset["prefix_lengths"]
    kinds = args.prefix_kinds
    notes = payload["notes"]
    impls = importable_impls([i for i in MODEL_IMPLS if i in args.impls or i == "floor"],
                             {"fastpeft": "fastpeft", "peft": "peft", "floor": "transformers"}, "floor", notes,
                             "model step")
    if impls is None:
        return
    payload["model_config"] = {
        "model": "LlamaForCausalLM, random weights" + ("" if ctx["quick"] else
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
        "target": f"ms(peft) / ms(fastpeft) >= {STEP_TARGET}"}
    print(f"\nModel step: Llama, hidden {dims['hidden']}, {dims['layers']} layers, heads {dims['heads']}, "
          f"intermediate {dims['intermediate']}, vocab {dims['vocab']}, {dtype_name(dtype)}; L {lengths}; "
          f"P {prefixes}; B = {dims['tokens']} // L; prefix {kinds}; impls {impls}", flush=True)
    max_positions = max(lengths) + max(prefixes)
    try:
        base = random_llama(dims, max_positions, dtype, device, args.seed).train()
        floor = copy.deepcopy(base)
        floor.model.norm.weight.requires_grad_(True)
    except Exception as exc:
        notes.append(f"model step skipped: building the model failed: {type(exc).__name__}: {str(exc)[:160]}")
        print(f"NOTE: {notes[-1]}", flush=True)
        free_memory(device)
        return
    mctx = {**ctx, "dims": dims, "impls": impls, "base": base, "floor": floor}
    table = TablePrinter(model_columns())
    table.header()
    rows: list[Row] = []
    for L in lengths:
        for P in prefixes:
            for kind in kinds:
                _record(run_model_case(mctx, L, P, kind), rows, table, payload, "model", json_path)
    del base, floor, mctx
    free_memory(device)
    payload["model_summary"] = model_summary(payload["model"])


# ------------------------------------------------------------------------------------------------------------
# Command line and run
# ------------------------------------------------------------------------------------------------------------

def parse_modes(text: str) -> list[str]:
    names = {"fwd": "fwd", "forward": "fwd", "fwdbwd": "fwd+bwd", "fwd+bwd": "fwd+bwd", "train": "fwd+bwd",
             "decode": "decode", "step": MODEL_MODE, "model": MODEL_MODE}
    modes = []
    for m in str_list(text):
        if m.lower() not in names:
            raise argparse.ArgumentTypeError(f"unknown mode {m!r}; use fwd, fwdbwd, decode and/or step")
        modes.append(names[m.lower()])
    return list(dict.fromkeys(modes))


def parse_kinds(text: str) -> list[str]:
    kinds = str_list(text.lower())
    if not kinds or any(k not in PREFIX_KINDS for k in kinds):
        raise argparse.ArgumentTypeError(f"{text!r}: use flat and/or mlp")
    return list(dict.fromkeys(kinds))


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
    p.add_argument("--modes", type=parse_modes, default=[*MODES, MODEL_MODE],
                   help="fwd,fwdbwd,decode,step (default: all; step = the model section)")
    p.add_argument("--impls", type=str_list, default=list(ALL_IMPLS),
                   help=f"subset of {','.join(ALL_IMPLS)} (peft: the model section only; its floor always runs)")
    p.add_argument("--model-lengths", type=_driver.positive_ints, help="step: sequence lengths (default 512,2048)")
    p.add_argument("--model-prefix-lengths", type=_driver.positive_ints,
                   help="step: prefix lengths (default 10,30,100)")
    p.add_argument("--model-tokens", type=int, help="step: tokens per batch B·L (default 8192, quick 128)")
    p.add_argument("--model-layers", type=int, help="step: Llama layers (default 4, quick 2)")
    p.add_argument("--prefix-kinds", type=parse_kinds, default=list(PREFIX_KINDS),
                   help="step: flat and/or mlp (PEFT prefix_projection False/True; default both)")
    _driver.add_run_args(p)
    p.add_argument("--check-heads", type=int, default=4, help="query heads in the float64 check (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-check", action="store_true", help="skip the per-case correctness check")
    p.add_argument("--no-plot", action="store_true", help="write the JSON only")
    args = p.parse_args(argv)
    unknown = [i for i in args.impls if i not in ALL_IMPLS]
    if unknown:
        p.error(f"unknown implementation(s) {', '.join(unknown)}; choose from {', '.join(ALL_IMPLS)}")
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
    impls, notes = [i for i in args.impls if i in IMPLS], []
    op_modes = [m for m in args.modes if m in MODES]
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
          f"D {dims['head_dim']}; modes {op_modes}; impls {impls}; floor: {floor_backend}", flush=True)
    peaks = _driver.announce_peaks(device, dtype, timer)
    payload = {
        "benchmark": BENCH, **env, "complete": False, "notes": notes,
        "config": {"lengths": lengths, "prefix_lengths": prefixes, **dims, "batch": "tokens // L",
                   "prefix": "shared (1, H_kv, P, D)", "dtype": dtype_name(dtype), "modes": op_modes,
                   "impls": impls, "quick": quick, "seed": args.seed, "floor_backend": floor_backend,
                   "target": "ms(fastpeft, L, P) / ms(floor, L) <= (L + P) / L", "target_modes": list(TARGET_MODES),
                   "timer": {"method": timer.method(device), **vars(timer)}, "check": not args.no_check,
                   "check_slice": f"batch row 0, {args.check_heads} query heads, float64 reference"},
        "fastpeft_backends": _driver.backends(device) if "fastpeft" in impls else {},
        "peaks": peaks.to_dict(),
        "rows": [],
        "model": [],
    }
    ctx = {"args": args, "device": device, "dtype": dtype, "dims": dims, "impls": impls, "timer": timer,
           "peaks": peaks, "floor_ctx": floor_ctx, "quick": quick}
    all_rows: list[Row] = []
    table = TablePrinter(columns())
    if op_modes:
        table.header()
    for mode in op_modes:
        for L in lengths:
            for P in prefixes:
                _record(run_case(ctx, L, P, mode), all_rows, table, payload, "rows", json_path)
    if MODEL_MODE in args.modes:
        run_model_section(ctx, payload, json_path)
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


def finish_model(payload: dict) -> None:
    """The model section's pivots (speed-up over PEFT, ratios to the floor) and its target line."""
    flat = payload.get("model") or []
    pivots = [("fastpeft", "vs_peer", "step: fastpeft speed-up over PEFT (peft ms / fastpeft ms), by L:", ".2f"),
              ("fastpeft", "vs_base", "step: fastpeft time / floor time (no adapter), by L:", ".3f"),
              ("peft", "vs_base", "step: PEFT time / floor time (no adapter), by L:", ".3f")]
    for impl, key, title, fmt in pivots:
        rows = [r for r in flat if r["impl"] == impl]
        if rows and any(r.get(key) is not None for r in rows):
            print()
            print_pivot(rows, row_keys=("prefix", "P"), col_key="L", value_key=key, title=title, fmt=fmt)
    s = payload.get("model_summary")
    if s:
        w = s["worst"]
        print(f"target step: fastpeft's step >= {STEP_TARGET}x faster than PEFT's in {s['met']}/{s['cases']} cases; "
              f"worst L={w['L']} P={w['P']} {w['prefix']}: {w['vs_peer']:.2f}x")
    errs = [r["rel_err"] for r in flat if r["impl"] == "fastpeft" and r.get("rel_err") is not None]
    if errs:
        print(f"check step: fastpeft vs PEFT loss with equal prefixes, max rel_err {max(errs):.1e}")


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
    finish_model(payload)
    print(f"\nwrote {json_path}")
    if not args.no_plot:
        title = f"Prefix attention vs SDPA without prefix: {payload['device']['name']}, {dtype_name(dtype)}"
        png = plot_ratio_to_base(flat, json_path.with_suffix(".png"), title=title, panel_key="P", x_key="L",
                                 base="floor")
        if png:
            print(f"wrote {png}")


if __name__ == "__main__":
    sys.exit(main())
