"""The multi-adapter serving section (--modes serve, in the default run): tokens/s of model.generate for a batch
of 64 requests (quick: 4), each request its own rank-16 adapter (q/k/v/o + gate/up/down), prompt 128 (quick 8),
greedy, max_new_tokens = min_new_tokens = 64 (quick 4): base (the model without adapters), fastpeft
(fp.add_adapter x 64, generate(adapter_names=...)), peft (PeftModel with the same 64 adapters,
generate(adapter_names=...)). CUDA: LlamaForCausalLM with Llama-7B layer dims and --serve-layers layers (8), random
weights, bf16, sdpa; quick: hidden 64, 2 layers, fp32. Adapters in the model's dtype in both libraries
(--serve-adapter-dtype fp32: the libraries' default on a half-precision base); PEFT's weights are copied into
fastpeft's, then checked: last-token logits of the prompt, fastpeft vs PEFT and both vs PEFT's model in float32
(CUDA) / float64 (CPU) (rel_err: within checks.TOLERANCE or 2x PEFT's own error, else MISMATCH), and a short
greedy generation (token agreement, recorded: near-ties of a random model may flip). Time: wall clock +
torch.cuda.synchronize, median of 3 runs after one warm-up; tokens/s = B · max_new_tokens / time (prefill
included); flops (TFLOP/s column) = 2 · tokens · linear weights (+ adapters), attention left out. Target:
fastpeft's tokens/s >= 0.75x the base model's. Rows in payload["serve"], the settings in "serve_config", the target
in "serve_summary".
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from ..checks import tolerance
from ..devices import dtype_name, failure_note, free_memory, synchronize
from ..driver import Run, Section
from ..models import random_llama
from ..optional import importable_impls
from ..options import add_int_options
from ..report import Column
from ..roofline import Row, fill_metrics

MODE = "serve"
IMPLS = ("base", "fastpeft", "peft")
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FULL = {"hidden": 4096, "layers": 8, "heads": 32, "kv_heads": 32, "intermediate": 11008, "vocab": 32000,
              "batch": 64, "rank": 16, "prompt": 128, "new_tokens": 64, "check_tokens": 8}
QUICK = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 4, "intermediate": 128, "vocab": 128,
               "batch": 4, "rank": 16, "prompt": 8, "new_tokens": 4, "check_tokens": 4}
RUNS = 3
TARGET = 0.75  # tokens/s(fastpeft) / tokens/s(base)


def serve_models(base, dims: dict, impls, adapter_dtype: torch.dtype | None = None) -> tuple[dict, dict]:
    """{impl: model} and {impl: adapter dtype}: PEFT's model with `adapters` random adapters (init_lora_weights=False:
    B non-zero), fastpeft's with the same ones, PEFT's weights copied in; with `adapter_dtype` both models' adapters
    are cast to it (serving stacks keep adapters in the model's dtype; the libraries' default is float32)."""
    import fastpeft as fp

    models, dtypes = {"base": base}, {}
    r, names = dims["rank"], [f"a{i}" for i in range(dims["adapters"])]
    if "peft" in impls:
        import peft

        config = peft.LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=2 * r, target_modules=TARGET_MODULES,
                                 lora_dropout=0.0, init_lora_weights=False)
        with torch.device(next(base.parameters()).device):
            pm = peft.get_peft_model(copy.deepcopy(base), config, adapter_name=names[0])
            for name in names[1:]:
                pm.add_adapter(name, config)
        models["peft"] = (pm.to(adapter_dtype) if adapter_dtype is not None else pm).eval()
        dtypes["peft"] = str(next(p for n, p in pm.named_parameters() if ".lora_A." in n).dtype)
    if "fastpeft" in impls:
        fm = copy.deepcopy(base)
        for name in names:
            fp.add_adapter(fm, name, fp.LoRAConfig(r=r, alpha=2 * r, target_modules=TARGET_MODULES, init_weights=False))
        if "peft" in models:
            ours = dict(fm.named_parameters())
            with torch.no_grad():
                for n, p in models["peft"].named_parameters():
                    if ".lora_A." in n or ".lora_B." in n:
                        ours[n.removeprefix("base_model.model.").removesuffix(".weight")].copy_(p)
        models["fastpeft"] = (fm.to(adapter_dtype) if adapter_dtype is not None else fm).eval()
        dtypes["fastpeft"] = str(next(p for n, p in fm.named_parameters() if ".lora_A." in n).dtype)
    return models, dtypes


def serve_check(models: dict, ids: torch.Tensor, names: list[str], check_tokens: int, tolerance: float) -> dict:
    """With equal adapters: last-token logits of the prompt, fastpeft vs PEFT (logits_rel_err) and both against PEFT's
    model in a wider dtype (float32 on CUDA, float64 on CPU): fastpeft passes within `tolerance` of it or within 2x
    PEFT's own error; how far the adapters move the logits from the base model's; and a short greedy generation
    (the fraction of equal tokens: recorded, not judged, as near-ties of a random model may flip)."""
    peft_model = models["peft"]
    wide = torch.float64 if ids.device.type == "cpu" else torch.float32
    with torch.no_grad():
        logits = {impl: m(input_ids=ids, logits_to_keep=1, **({} if impl == "base" else {"adapter_names": names}))
                  .logits.to(wide) for impl, m in models.items()}
        oracle = copy.deepcopy(peft_model).to(wide)
        ref = oracle(input_ids=ids, logits_to_keep=1, adapter_names=names).logits
        del oracle
        free_memory(ids.device)
        tokens = {impl: generate(m, ids, names if impl != "base" else None, check_tokens)
                  for impl, m in models.items() if impl != "base"}

    def rel(a, b):
        return float((a - b).norm() / b.norm().clamp_min(1e-30))

    fast_err, peft_err = rel(logits["fastpeft"], ref), rel(logits["peft"], ref)
    agree = (tokens["fastpeft"] == tokens["peft"]).float().mean().item()
    return {"logits_rel_err": rel(logits["fastpeft"], logits["peft"]), "fastpeft_err_vs_wide": fast_err,
            "peft_err_vs_wide": peft_err, "logits_ok": fast_err <= max(tolerance, 2 * peft_err),
            "adapter_effect": rel(logits["fastpeft"], logits["base"]), "tokens_agree": agree,
            "tokens_equal": agree == 1.0, "check_tokens": check_tokens}


def generate(model, ids: torch.Tensor, names, new_tokens: int) -> torch.Tensor:
    """Greedy generation of exactly new_tokens tokens per row; the generated part (B, new_tokens)."""
    kwargs = {"adapter_names": names} if names is not None else {}
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0, **kwargs)
    return out[:, ids.shape[1]:]


def serve_flops(dims: dict, B: int, prompt: int, new_tokens: int, with_adapters: bool) -> float:
    """2 · tokens · linear weights: every layer's linears on B·(prompt + new_tokens - 1) tokens (prefill, then one
    forward per generated token but the last), the LM head on B·new_tokens; plus the adapters; attention left out."""
    h, n, H, Hkv, I, V, r = (dims[k] for k in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab",
                                               "rank"))
    D = h // H
    shapes = [(h, H * D), (h, Hkv * D), (h, Hkv * D), (H * D, h), (h, I), (h, I), (I, h)]
    weights = sum(k * m for k, m in shapes)
    adapter = sum(r * (k + m) for k, m in shapes) if with_adapters else 0
    tokens = B * (prompt + new_tokens - 1)
    return float(2 * tokens * n * (weights + adapter) + 2 * B * new_tokens * h * V)


def run_serve(run: Run) -> None:
    """The serving loop: base, fastpeft and PEFT generate for the same batch; rows in payload["serve"]."""
    args, device, dtype, quick, payload = run.args, run.device, run.dtype, run.quick, run.payload
    dims = dict(QUICK if quick else FULL)
    for k in ("layers", "batch", "prompt", "new_tokens"):
        dims[k] = getattr(args, f"serve_{k}") or dims[k]
    dims["adapters"] = args.serve_adapters or dims["batch"]
    impls = importable_impls([i for i in IMPLS if i in args.impls or i == "base"],
                             {"base": "transformers", "fastpeft": "fastpeft", "peft": "peft"}, "base", run.notes,
                             "serve")
    if impls is None:
        return
    B, P, T = dims["batch"], dims["prompt"], dims["new_tokens"]
    names = [f"a{i % dims['adapters']}" for i in range(B)]
    payload["serve_config"] = {
        "model": "LlamaForCausalLM, random weights" + ("" if quick else f" with Llama-7B layer dims, "
                                                       f"{dims['layers']} layers (of 32)"),
        **dims, "dtype": dtype_name(dtype), "impls": impls, "attention": "sdpa", "targets": TARGET_MODULES,
        "lora_alpha": "2r", "rows": "request i uses adapter a<i % adapters>",
        "generate": f"greedy, max_new_tokens = min_new_tokens = {T}, KV cache",
        "timing": f"wall clock + synchronize, median of {RUNS} after one warm-up",
        "tokens_per_s": "B * new_tokens / time (prefill included)",
        "check": "PEFT's adapters copied into fastpeft's; last-token logits rel_err and greedy token agreement",
        "target": f"tokens/s(fastpeft) / tokens/s(base) >= {TARGET}"}
    print(f"\nServing loop: Llama hidden {dims['hidden']}, {dims['layers']} layers, intermediate "
          f"{dims['intermediate']}, vocab {dims['vocab']}, {dtype_name(dtype)}; {B} requests over {dims['adapters']} "
          f"rank-{dims['rank']} adapters; prompt {P}, {T} new tokens; impls {impls}", flush=True)
    try:
        base = random_llama(dims, P + T + 8, dtype, device, args.seed)
        cast = dtype if args.serve_adapter_dtype == "model" else None
        models, adapter_dtypes = serve_models(base, dims, impls, cast)
    except Exception as exc:
        run.note(f"serve skipped: building the models failed: {type(exc).__name__}: {str(exc)[:200]}")
        free_memory(device)
        return
    payload["serve_config"]["adapter_dtypes"] = adapter_dtypes
    generator = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, dims["vocab"], (B, P), generator=generator).to(device)
    check = None
    limit = tolerance(dtype)
    if not args.no_check and "fastpeft" in models and "peft" in models:
        try:
            check = serve_check(models, ids, names, min(dims["check_tokens"], T), limit)
            if not check["logits_ok"]:
                print(f"  WARNING: serve: fastpeft's logits are {check['fastpeft_err_vs_wide']:.2e} from the "
                      f"{'float64' if device.type == 'cpu' else 'float32'} model (PEFT's "
                      f"{check['peft_err_vs_wide']:.2e}; tolerance {limit})", flush=True)
        except Exception as exc:
            print(f"  serve check failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            free_memory(device)
    case = {"model": "llama", "layers": dims["layers"], "hidden": dims["hidden"], "B": B, "prompt": P,
            "new_tokens": T, "adapters": dims["adapters"], "rank": dims["rank"], "dtype": dtype_name(dtype)}
    rows = []
    table = run.table(serve_columns())
    for impl in impls:
        runs, note = [], ""
        try:
            with torch.no_grad():
                for _ in range(1 + RUNS):
                    synchronize(device)
                    t0 = time.perf_counter()
                    generate(models[impl], ids, names if impl != "base" else None, T)
                    synchronize(device)
                    runs.append((time.perf_counter() - t0) * 1e3)
        except Exception as exc:
            note = failure_note(exc)
            print(f"  serve {impl}: {note}", flush=True)
            free_memory(device)
        ms = statistics.median(runs[1:]) if len(runs) == 1 + RUNS else None
        extra = {"runs_ms": runs[1:], "tokens_per_s": B * T / (ms * 1e-3) if ms else None}
        if impl != "base" and check is not None:
            extra.update(check)
            if impl == "fastpeft" and not check["logits_ok"]:
                note = (note + " MISMATCH").strip()
        rows.append(Row(run.family.bench, case, MODE, impl, ms, serve_flops(dims, B, P, T, impl != "base"), 0.0,
                        rel_err=check[f"{impl}_err_vs_wide"] if check and impl != "base" else None, note=note,
                        extra=extra))
    fill_metrics(rows, None, base="base", peer="peft")
    base_tps = next((r.extra["tokens_per_s"] for r in rows if r.impl == "base"), None)
    for row in rows:
        tps = row.extra["tokens_per_s"]
        row.extra["throughput_vs_base"] = tps / base_tps if tps and base_tps else None
        row.extra["speedup_over_peft"] = row.vs_peer
    run.record("serve", rows, table)
    fast = next((r for r in payload["serve"] if r["impl"] == "fastpeft"), None)
    value = fast["throughput_vs_base"] if fast else None
    payload["serve_summary"] = {
        "applicable": device.type == "cuda", "throughput_vs_base": value, "threshold": TARGET,
        "met": None if value is None or device.type != "cuda" else value >= TARGET,
        "speedup_over_peft": fast["vs_peer"] if fast else None, "check": check}
    run.write()
    del models, base
    free_memory(device)


def serve_columns() -> list[Column]:
    return [Column("B", "B", 4), Column("prompt", "prompt", 6), Column("new_tokens", "new", 4),
            Column("adapters", "adapt", 5), Column("impl", "impl", 8), Column("ms", "ms", 10, ".1f"),
            Column("tokens_per_s", "tok/s", 9, ".1f"), Column("throughput_vs_base", "x base tok/s", 12, ".3f"),
            Column("vs_peer", "vs peft", 7, ".2f"), Column("tflops", "TFLOP/s", 8, ".2f"),
            Column("rel_err", "logit_err", 9, ".1e"), Column("tokens_agree", "agree", 5, ".2f"),
            Column("note", "note", 4)]


def report_serve(run: Run) -> None:
    """The serving target and the check."""
    s, device_type = run.payload.get("serve_summary"), run.device.type
    if not s:
        return
    head = f"target serve: fastpeft tokens/s >= {s['threshold']:g}x the base model's:"
    if not s["applicable"]:
        print(f"{head} not applicable on {device_type} (the target is for CUDA GPUs)")
    elif s["throughput_vs_base"] is None:
        print(f"{head} not measured")
    else:
        peft = f"; {s['speedup_over_peft']:.2f}x PEFT's speed" if s["speedup_over_peft"] else ""
        print(f"{head} {s['throughput_vs_base']:.3f} -> {'met' if s['met'] else 'NOT met'}{peft}")
    c = s.get("check")
    if c:
        print(f"check serve: equal adapters: last-token logits fastpeft vs PEFT rel_err {c['logits_rel_err']:.1e}; "
              f"vs the wide-dtype PEFT model fastpeft {c['fastpeft_err_vs_wide']:.1e}, "
              f"PEFT {c['peft_err_vs_wide']:.1e} "
              f"({'ok' if c['logits_ok'] else 'MISMATCH'}); the adapters move them by {c['adapter_effect']:.2f} from "
              f"the base; greedy tokens agree {100 * c['tokens_agree']:.0f}% over {c['check_tokens']} tokens")


def options(p: argparse.ArgumentParser) -> None:
    add_int_options(p, {"--serve-layers": "serve: Llama layers (default 8, quick 2)",
                        "--serve-batch": "serve: requests per batch (default 64, quick 4)",
                        "--serve-adapters": "serve: adapters (default: one per request)",
                        "--serve-prompt": "serve: prompt length (default 128, quick 8)",
                        "--serve-new-tokens": "serve: generated tokens (default 64, quick 4)"})
    p.add_argument("--serve-adapter-dtype", choices=("model", "fp32"), default="model",
                   help="serve: adapters in the model's dtype (default, as serving stacks keep them) or float32 (the "
                        "libraries' default on a half-precision base)")


SECTION = Section(modes=(MODE,), run=run_serve, report=report_serve, options=options)
