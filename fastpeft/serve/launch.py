"""`fastpeft serve`: load a model and its adapters, start the engine and the HTTP server.

    fastpeft serve --model DIR [--adapter NAME=PATH ...] [--host 127.0.0.1] [--port 8000] [--dtype auto]
                   [--device cpu|cuda] [--max-batch-tokens N] [--max-queue N] [--served-model-name NAME]
"""
from __future__ import annotations

import argparse
import os
import sys

DEPENDENCIES = ("fastapi", "uvicorn", "pydantic")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a transformers causal LM folder (with its tokenizer)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                        help="an adapter to serve as NAME (fastpeft, PEFT or AdapterHub checkpoint); repeatable")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="tokens per scheduler step")
    parser.add_argument("--kv-cache-tokens", type=int, default=None, help="tokens of paged KV cache in all")
    parser.add_argument("--max-queue", type=int, default=256, help="requests held at once; more get 503")
    parser.add_argument("--served-model-name", default=None, help="the base model's id (default: the folder name)")


def check_dependencies() -> str | None:
    import importlib.util

    missing = [d for d in DEPENDENCIES if importlib.util.find_spec(d) is None]
    if missing:
        return (f"fastpeft serve needs {', '.join(missing)}: install the serve extra, pip install 'fastpeft[serve]' "
                "(or pip install fastapi uvicorn pydantic).")
    return None


def parse_adapters(specs: list[str]) -> dict[str, str]:
    adapters = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"fastpeft serve: --adapter {spec!r}: expected NAME=PATH, e.g. --adapter math=./lora-math")
        if name in adapters:
            raise SystemExit(f"fastpeft serve: --adapter {name!r} is given twice; give each adapter one name.")
        adapters[name] = path
    return adapters


def build(args: argparse.Namespace):
    """(engine, app): the model and adapters loaded, the engine started."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .engine import Engine
    from .server import create_app

    adapters = parse_adapters(args.adapter)
    if not os.path.isdir(args.model):
        raise SystemExit(f"fastpeft serve: --model {args.model!r} is not a folder; pass a saved transformers model "
                         "(python -m fastpeft.serve.tiny DIR writes a tiny one).")
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except Exception as exc:
        raise SystemExit(f"fastpeft serve: no tokenizer could be loaded from {args.model} ({exc}); save one there "
                         "with tokenizer.save_pretrained.") from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    engine = Engine(model, max_batch_tokens=args.max_batch_tokens, kv_cache_tokens=args.kv_cache_tokens,
                    max_queue=args.max_queue,
                    eos_token_id=None if model.generation_config.eos_token_id is not None else tokenizer.eos_token_id)
    for name, path in adapters.items():
        engine.load_adapter(name, path)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    engine.start()
    return engine, create_app(engine, tokenizer, name)


def main(args: argparse.Namespace) -> int:
    problem = check_dependencies()
    if problem:
        print(problem, file=sys.stderr)
        return 2
    import uvicorn

    from .engine import Rejected

    try:
        engine, app = build(args)
    except Rejected as exc:
        print(f"fastpeft serve: {exc.message}", file=sys.stderr)
        return 2
    print(f"fastpeft serve: {args.model} with adapters {engine.adapters or 'none'} on http://{args.host}:{args.port}",
          flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.close()
    return 0
