"""`fastpeft bench serve`: the serving engine (fastpeft/serve) under load, with N adapters against none.

For N in --adapters (0 = no adapter loaded: the baseline) rank-r LoRA adapters on every linear layer, requests pick
their adapter with uniform or Zipf (s=1.1) popularity, and arrive either all at once (saturation) or as a Poisson
process at --rate requests/s. Each request has a --prompt-len token prompt and generates exactly --gen-len tokens.
Reported per run: throughput (generated tokens/s over the run's wall time), time to first token and per-token latency
(p50, p99), every request answered; and each adapter run's throughput as a fraction of the no-adapter run's
(issue 17's targets, recorded not asserted: >= 0.9 on a GPU, >= 0.8 on the CPU with 64 rank-16 adapters).
The load generator drives the engine in-process (no HTTP in the timings). JSON goes to benchmarks/results (--out).

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

import torch

from .options import int_list


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
    p.add_argument("--out", default=None, help="folder of the JSON (default benchmarks/results)")
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


def main(argv=None) -> int:
    import fastpeft as fp
    from ..serve import Engine
    from .results import environment, result_path, write_json

    args = parse(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = build_model(args, device, dtype)
    vocab = model.config.get_text_config().vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(min(vocab, 256)) for _ in range(args.prompt_len)] for _ in range(args.requests)]
    runs = []
    for n in args.adapters:
        for name in list(fp.adapters(model)) if fp.inject.state.get_state(model) else []:
            fp.delete_adapter(model, name)
        names = add_adapters(model, n, args.rank)
        for popularity in (["none"] if n == 0 else [p for p in args.popularity.split(",") if p]):
            chosen = pick(names, popularity, args.requests, random.Random(n))
            for mode, rate in [("saturation", None)] + ([("rate", args.rate)] if args.rate else []):
                with Engine(model, max_batch_tokens=args.max_batch_tokens, max_queue=args.requests + 1) as engine:
                    run_load(engine, prompts[:2], chosen[:2], 2, None)  # warm-up
                    result = run_load(engine, prompts, chosen, args.gen_len, rate)
                result.update(adapters=n, popularity=popularity, mode=mode, rate=rate, rank=args.rank)
                runs.append(result)
                print(f"adapters={n:<3} {popularity:<8} {mode:<10} {result['tokens_per_s']:9.1f} tok/s  "
                      f"ttft p50 {result['ttft_ms']['p50']:8.1f} ms p99 {result['ttft_ms']['p99']:8.1f}  "
                      f"token p50 {result['per_token_ms']['p50']:7.2f} ms p99 {result['per_token_ms']['p99']:7.2f}  "
                      f"answered {result['answered']}/{result['requests']}", flush=True)
    base = {r["mode"]: r["tokens_per_s"] for r in runs if r["adapters"] == 0}
    for r in runs:
        r["vs_no_adapters"] = r["tokens_per_s"] / base[r["mode"]] if r["mode"] in base else None
    when = datetime.now(timezone.utc)
    payload = {"bench": "serve", **environment(device, ["-m", "fastpeft", "bench", "serve", *(argv or [])], when=when),
               "settings": {k: v for k, v in vars(args).items() if k != "out"}, "dtype": str(dtype), "runs": runs}
    path = write_json(result_path(args.out or "benchmarks/results", device, "serve", when), payload)
    print(f"wrote {path}")
    return 0
