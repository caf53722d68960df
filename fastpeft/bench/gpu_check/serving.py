"""The serving section: `fastpeft bench serve`'s load generator (bench/serve.py `measure`) on the serving engine
(fastpeft/serve: transformers' continuous batching, each step's tokens routed to their request's adapter) with a
random Llama-shaped model (on the GPU: hidden 2048, 8 layers, 32 heads over 8 key/value heads, intermediate 8192,
vocab 32000; bf16), 64 rank-16 LoRA adapters on every linear layer with uniform and Zipf popularity against the same
model with no adapter; saturation (every request queued at once: 64 requests of 128 prompt + 64 generated tokens).

Rows, one per run: impl "base" (no adapter loaded) or the popularity; "ms" = 1000 / tokens/s (wall time per
generated token of the whole run); vs_base = that / the base run's (time ratio, as every section's plot);
vs_no_adapters = tokens/s / the base run's tokens/s (issue 17's target serve_64_adapters >= 0.9 on a GPU, recorded
not asserted); TTFT and per-token latency p50/p99. The engine's ops dispatch as a user's server would (no pin: the
manager steps on its own thread, outside any context-variable pin).
"""
from __future__ import annotations

import random

from .. import serve as bench_serve
from ..devices import dtype_name, failure_note, free_memory
from ..models import random_llama
from .context import Check
from .plan import Guard

SECTION = "serve"


def row(run: dict) -> dict:
    """A run of bench_serve.measure as a flat row of the section."""
    if run.get("skipped"):
        return {"impl": "base" if run["adapters"] == 0 else run["popularity"], "adapters": run["adapters"],
                "mode": run["mode"], "note": "skipped (time guard)"}
    return {"impl": "base" if run["adapters"] == 0 else run["popularity"], "adapters": run["adapters"],
            "mode": run["mode"], "rank": run["rank"], "ms": 1e3 / run["tokens_per_s"],
            "tokens_per_s": run["tokens_per_s"],
            "ttft_p50_ms": run["ttft_ms"]["p50"], "ttft_p99_ms": run["ttft_ms"]["p99"],
            "token_p50_ms": run["per_token_ms"]["p50"], "token_p99_ms": run["per_token_ms"]["p99"],
            "requests": run["requests"], "answered": run["answered"], "wall_s": run["wall_s"],
            "note": "; ".join(run.get("errors") or [])[:200]}


def _ratios(rows: list[dict]) -> None:
    base = {r["mode"]: r for r in rows if r["impl"] == "base" and r.get("ms")}
    for r in rows:
        ref = base.get(r["mode"])
        if r.get("ms") and ref is not None:
            r["vs_base"] = r["ms"] / ref["ms"]
            r["vs_no_adapters"] = r["tokens_per_s"] / ref["tokens_per_s"]


def run_serve(check: Check) -> None:
    plan = check.plan.serve
    guard = Guard(check.budget, SECTION)
    dims = plan["dims"]
    print(f"\n== {SECTION}: Llama {dims}, adapters {plan['adapters']} rank {plan['rank']} "
          f"({', '.join(plan['popularity'])}), {plan['requests']} requests of {plan['prompt_len']} + "
          f"{plan['gen_len']} tokens; {guard.allowed_s:.0f} s allowed ==", flush=True)
    entry = check.section(SECTION, {**plan, "dtype": dtype_name(check.dtype)})
    rows = entry["rows"]

    def on_run(run):
        rows.append(row(run))
        _ratios(rows)
        print("  " + bench_serve.describe({**run, "vs_no_adapters": rows[-1].get("vs_no_adapters")}), flush=True)
        check.write()

    model = None
    try:
        model = random_llama(dims, plan["prompt_len"] + plan["gen_len"] + 64, check.dtype, check.device, seed=0)
        rng = random.Random(0)
        prompts = [[rng.randrange(min(dims["vocab"], 256)) for _ in range(plan["prompt_len"])]
                   for _ in range(plan["requests"])]
        runs = bench_serve.measure(model, adapters=plan["adapters"], popularity=plan["popularity"], rank=plan["rank"],
                                   prompts=prompts, gen_len=plan["gen_len"], rate=plan.get("rate") or None,
                                   max_batch_tokens=plan.get("max_batch_tokens"), on_run=on_run,
                                   # every request's pages at once (not transformers' share of free GPU memory)
                                   kv_cache_tokens=plan["requests"] * (plan["prompt_len"] + plan["gen_len"] + 32),
                                   expired=guard.expired)
        for run in runs:
            if run.get("skipped"):
                guard.skip(f"adapters={run['adapters']} {run['popularity']} {run['mode']}")
                rows.append(row(run))
    except Exception as exc:  # recorded; the run goes on with the next section
        entry.setdefault("errors", []).append(failure_note(exc))
        print(f"  {SECTION}: {failure_note(exc)}", flush=True)
    finally:
        del model
        free_memory(check.device)
    entry["guard"] = guard.record()
    check.write()
