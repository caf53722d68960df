"""`fastpeft bench serve`: the serving engine (fastpeft/serve) under load, with N adapters against none.

For N in --adapters (0 = no adapter loaded: the baseline) rank-r LoRA adapters on every linear layer, requests pick
their adapter with uniform or Zipf (s=1.1) popularity, and arrive either all at once (saturation) or as a Poisson
process at --rate requests/s. Each request has a --prompt-len token prompt and generates exactly --gen-len tokens.
Reported per run: throughput (generated tokens/s over the run's wall time), time to first token and per-token latency
(p50, p99), every request answered; and each adapter run's throughput as a fraction of the no-adapter run's
(issue 17's targets, recorded not asserted: >= 0.9 on a GPU, >= 0.8 on the CPU with 64 rank-16 adapters).
The load generator drives the engine in-process (no HTTP in the timings). As every family's run (results.py): the
JSON <out>/<device>-serve-<date>.json (default benchmarks/results; rewritten after every run, "complete" at the
end) with device, versions, git commit and the exact command, and beside it the plot (.png, matplotlib): throughput
against the number of adapters (uniform and Zipf, the no-adapter run as a line), and TTFT / per-token latency
p50 and p99. gpu-check's "serve" section runs `measure` on a Llama-shaped model.

    fastpeft bench serve [--model DIR] [--adapters 0,1,8,64] [--rank 16] [--requests 64] [--rate 20] [--quick]
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from .options import int_list


WARMUP = 8  # requests (full prompts, 2 tokens each) each run's engine serves before the timed load


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fastpeft bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a saved causal LM folder (default: the tiny built-in Llama)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--adapters", type=int_list, default=[0, 1, 8, 64], help="adapter counts, 0 = none loaded")
    p.add_argument("--popularity", default="uniform,zipf", help="uniform, zipf or both")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--rate", type=float, default=20.0, help="requests/s of the fixed-rate runs (0: none)")
    p.add_argument("--max-batch-tokens", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="a few small runs (the CPU suite's dry run): 0 and 8 "
                   "adapters, Zipf, 8 requests of 8 + 4 tokens")
    p.add_argument("--out", default=None, help="folder of the JSON and the plot (default benchmarks/results)")
    p.add_argument("--no-plot", action="store_true", help="write the JSON only")
    args = p.parse_args(argv)
    if args.quick:
        args.adapters, args.requests, args.prompt_len, args.gen_len = [0, 8], 8, 8, 4
        args.popularity = "zipf"
    return args


def build_model(args, device: torch.device, dtype: torch.dtype):
    if args.model is None:
        from ..serve.tiny import build_model as tiny

        return tiny(seed=0).to(device, dtype)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()


def add_adapters(model, n: int, rank: int) -> list[str]:
    import fastpeft as fp

    names = [f"a{i}" for i in range(n)]
    for i, name in enumerate(names):
        fp.add_adapter(model, name, fp.LoRAConfig(r=rank, alpha=2 * rank, target_modules="all-linear"))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith(f"lora_B.{name}"):
                    p.copy_((torch.randn(p.shape, generator=g) * 0.01).to(p))
    model.eval()
    return names


def pick(names: list[str], popularity: str, count: int, rng: random.Random) -> list[str | None]:
    if not names:
        return [None] * count
    weights = [1.0 / (i + 1) ** 1.1 for i in range(len(names))] if popularity == "zipf" else None
    return rng.choices(names, weights=weights, k=count)


def run_load(engine, prompts, adapters, gen_len: int, rate: float | None) -> dict:
    """Submit every request (at `rate` per second, Poisson, or all at once); wait for all; the timings."""
    from ..serve import SamplingParams

    n = len(prompts)
    stamps = [[] for _ in range(n)]
    sent = [0.0] * n
    errors = []
    done = threading.Semaphore(0)
    rng = random.Random(1)

    def keep(i):
        def on_output(out):
            stamps[i].append(time.perf_counter())
            if out.finished:
                if out.error:
                    errors.append(out.error)
                done.release()
        return on_output

    start = time.perf_counter()
    for i in range(n):
        if rate:
            time.sleep(rng.expovariate(rate))
        sent[i] = time.perf_counter()
        engine.submit(prompts[i], adapters[i], SamplingParams(max_tokens=gen_len), keep(i), ignore_eos=True)
    for _ in range(n):
        done.acquire()
    wall = time.perf_counter() - start
    ttft = [s[0] - t for s, t in zip(stamps, sent) if s]
    gaps = [b - a for s in stamps for a, b in zip(s, s[1:])]
    return {"requests": n, "answered": sum(1 for s in stamps if s) - len(errors), "errors": errors[:3],
            "wall_s": wall, "tokens_per_s": n * gen_len / wall,
            "ttft_ms": _percentiles(ttft), "per_token_ms": _percentiles(gaps)}


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": float("nan"), "p99": float("nan")}
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else [values[0]] * 99
    return {"p50": 1e3 * statistics.median(values), "p99": 1e3 * q[98]}


def measure(model, *, adapters, popularity, rank: int, prompts: list[list[int]], gen_len: int, rate: float | None,
            max_batch_tokens: int | None = None, kv_cache_tokens: int | None = None, on_run=None,
            expired=lambda: False) -> list[dict]:
    """Every run: for each adapter count (0: the baseline, none loaded) and popularity, saturation and (with `rate`)
    the fixed rate; each a fresh Engine after a warm-up (WARMUP requests). `on_run(run)` sees each result as it comes;
    once `expired()` the runs left are skipped (recorded with "skipped": True). The adapters are deleted at the end.
    Each run gets "vs_no_adapters": its throughput / the no-adapter run's in the same mode (None without one)."""
    import fastpeft as fp
    from ..inject.state import get_state
    from ..serve import Engine

    runs = []
    modes = [("saturation", None)] + ([("rate", rate)] if rate else [])
    try:
        for n in adapters:
            for name in list(fp.adapters(model)) if get_state(model) else []:
                fp.delete_adapter(model, name)
            names = add_adapters(model, n, rank) if not expired() else [f"a{i}" for i in range(n)]  # skipped: none
            for pop in (["none"] if n == 0 else popularity):
                chosen = pick(names, pop, len(prompts), random.Random(n))
                for mode, r in modes:
                    case = dict(adapters=n, popularity=pop, mode=mode, rate=r, rank=rank)
                    if expired():
                        runs.append({**case, "skipped": True})
                        continue
                    with Engine(model, max_batch_tokens=max_batch_tokens, kv_cache_tokens=kv_cache_tokens,
                                max_queue=len(prompts) + 1) as engine:
                        # warm-up: a full step of prefill (the first run of a process is otherwise the slowest)
                        run_load(engine, prompts[:WARMUP], chosen[:WARMUP], 2, None)
                        result = {**run_load(engine, prompts, chosen, gen_len, r), **case}
                    runs.append(result)
                    if on_run is not None:
                        on_run(result)
    finally:
        for name in list(fp.adapters(model)) if get_state(model) else []:
            fp.delete_adapter(model, name)
    ratios(runs)
    return runs


def ratios(runs: list[dict]) -> None:
    """Each run's "vs_no_adapters": tokens/s over the no-adapter run's in the same mode."""
    base = {r["mode"]: r["tokens_per_s"] for r in runs if r["adapters"] == 0 and r.get("tokens_per_s")}
    for r in runs:
        if r.get("tokens_per_s"):
            r["vs_no_adapters"] = r["tokens_per_s"] / base[r["mode"]] if r["mode"] in base else None


def describe(run: dict) -> str:
    if run.get("skipped"):
        return f"adapters={run['adapters']:<3} {run['popularity']:<8} {run['mode']:<10} skipped (time guard)"
    ratio = run.get("vs_no_adapters")
    return (f"adapters={run['adapters']:<3} {run['popularity']:<8} {run['mode']:<10} {run['tokens_per_s']:9.1f} tok/s"
            f"{'' if ratio is None else f' ({ratio:.3f}x none)'}  ttft p50 {run['ttft_ms']['p50']:8.1f} ms p99 "
            f"{run['ttft_ms']['p99']:8.1f}  token p50 {run['per_token_ms']['p50']:7.2f} ms p99 "
            f"{run['per_token_ms']['p99']:7.2f}  answered {run['answered']}/{run['requests']}")


def plot(runs: list[dict], path: Path, *, title: str) -> Path | None:
    """One row per mode: tokens/s against the number of adapters (one line per popularity, the no-adapter run a
    dashed line), time to first token and per-token latency (p50 solid, p99 dotted). None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        print(f"plot skipped: matplotlib is not available ({exc})", flush=True)
        return None
    runs = [r for r in runs if r.get("tokens_per_s")]
    modes = list(dict.fromkeys(r["mode"] for r in runs))
    if not modes:
        print("plot skipped: no run measured", flush=True)
        return None
    pops = [p for p in dict.fromkeys(r["popularity"] for r in runs) if p != "none"]
    colors = {p: f"C{i}" for i, p in enumerate(pops)}
    counts = sorted({r["adapters"] for r in runs if r["adapters"] > 0})
    fig, axes = plt.subplots(len(modes), 3, figsize=(13, 3.6 * len(modes)), squeeze=False)
    panels = (("tokens_per_s", "throughput (tokens/s)"), ("ttft_ms", "time to first token (ms)"),
              ("per_token_ms", "per-token latency (ms)"))
    for i, mode in enumerate(modes):
        here = [r for r in runs if r["mode"] == mode]
        base = next((r for r in here if r["adapters"] == 0), None)
        for j, (key, label) in enumerate(panels):
            ax = axes[i][j]
            for p in pops:
                pts = sorted((r["adapters"], r[key]) for r in here if r["popularity"] == p)
                if not pts:
                    continue
                xs = [x for x, _ in pts]
                if key == "tokens_per_s":
                    ax.plot(xs, [v for _, v in pts], color=colors[p], marker="o", ms=4, label=p)
                else:
                    ax.plot(xs, [v["p50"] for _, v in pts], color=colors[p], marker="o", ms=4, label=f"{p} p50")
                    ax.plot(xs, [v["p99"] for _, v in pts], color=colors[p], marker="^", ms=4, ls=":",
                            label=f"{p} p99")
            if base is not None:
                if key == "tokens_per_s":
                    ax.axhline(base[key], color="0.3", ls="--", lw=1, label="no adapters")
                else:
                    ax.axhline(base[key]["p50"], color="0.3", ls="--", lw=1, label="no adapters p50")
                    ax.axhline(base[key]["p99"], color="0.6", ls="--", lw=1, label="no adapters p99")
            if counts:
                ax.set_xscale("log", base=2)
                ax.set_xticks(counts)
                ax.set_xticklabels([str(c) for c in counts])
                ax.minorticks_off()
            ax.set_ylim(bottom=0)
            rate = here[0].get("rate")
            ax.set_title(f"{label} - {mode}" + (f" ({rate:g} requests/s)" if rate else ""), fontsize=10)
            ax.set_xlabel("adapters loaded (requests spread over them)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    from .results import environment, result_path, write_json

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = build_model(args, device, dtype)
    text = model.config.get_text_config()
    rng = random.Random(0)
    prompts = [[rng.randrange(min(text.vocab_size, 256)) for _ in range(args.prompt_len)] for _ in range(args.requests)]
    when = datetime.now(timezone.utc)
    env = environment(device, ["-m", "fastpeft", "bench", "serve", *argv], when=when)
    path = result_path(args.out or "benchmarks/results", device, "serve", when)
    model_desc = {"source": args.model or "fastpeft.serve.tiny", "hidden": text.hidden_size,
                  "layers": text.num_hidden_layers, "intermediate": getattr(text, "intermediate_size", None),
                  "vocab": text.vocab_size, "parameters": sum(p.numel() for p in model.parameters())}
    payload = {"benchmark": "serve", **env, "complete": False, "dtype": str(dtype).removeprefix("torch."),
               "threads": torch.get_num_threads(), "model": model_desc,
               "settings": {k: v for k, v in vars(args).items() if k not in ("out", "no_plot")}, "runs": []}
    print(f"serve benchmark on {env['device']['name']} ({device.type}), {payload['dtype']}, "
          f"{torch.get_num_threads()} threads; model {model_desc}; results: {path}", flush=True)

    def on_run(run):
        payload["runs"].append(run)
        ratios(payload["runs"])
        print(describe(run), flush=True)
        write_json(path, payload)

    popularity = [p for p in args.popularity.split(",") if p]
    payload["runs"] = measure(model, adapters=args.adapters, popularity=popularity, rank=args.rank, prompts=prompts,
                              gen_len=args.gen_len, rate=args.rate or None, max_batch_tokens=args.max_batch_tokens,
                              on_run=on_run)
    payload["complete"] = True
    write_json(path, payload)
    print(f"wrote {path}")
    if not args.no_plot:
        png = plot(payload["runs"], path.with_suffix(".png"),
                   title=f"fastpeft serve: rank-{args.rank} LoRA adapters vs none, {env['device']['name']}, "
                         f"{payload['dtype']} ({args.requests} requests, {args.prompt_len}+{args.gen_len} tokens)")
        if png:
            print(f"wrote {png}")
    return 0
