"""The `fastpeft` command.

    fastpeft demo [--steps N] [--seed S] [--quick]   train LoRA on a tiny built-in model, merge, generate, time it
    fastpeft info                                    versions, and the backend each op uses here and why
    fastpeft bench <family> [args...]                run a microbenchmark (fastpeft/bench/<family>)
    fastpeft serve --model DIR --adapter NAME=PATH   serve adapters over an OpenAI-compatible HTTP API
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys
from pathlib import Path


# ------------------------------------------------------------------------------------------------------------
# fastpeft info
# ------------------------------------------------------------------------------------------------------------

def _version(dist: str) -> str:
    """A distribution's installed version, read without importing it."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cuda_line() -> str:
    import torch

    if not torch.cuda.is_available():  # asks the driver; does not initialise CUDA
        build = torch.version.cuda or torch.version.hip
        return "not available" + ("" if build else " (this torch build has no CUDA support)")
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return f"available, {len(names)} device(s): {', '.join(names)}"


def _cuda_ext_line() -> str:
    """The CUDA C++ extension: built, loadable (compiles on first use) or not available and why. Never compiles."""
    from fastpeft.ops import cuda_ext

    usable, why = cuda_ext.status()
    return why if usable else f"not available: {why}"


def cmd_info(args: argparse.Namespace) -> int:
    """Print versions, then for every registered op the backend it would use on CPU and CUDA tensors here."""
    import torch

    import fastpeft
    from fastpeft.errors import BackendError
    from fastpeft.ops import dispatch, registry

    triton_ok, triton_why = dispatch.triton_status()
    rows = [
        ("fastpeft", f"{fastpeft.__version__} ({Path(fastpeft.__file__).parent})"),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("torch", f"{torch.__version__} (CUDA build: {torch.version.cuda or 'none'})"),
        ("triton", _version("triton") if triton_ok else f"not usable: {triton_why}"),
        ("transformers", _version("transformers")),
        ("peft", _version("peft")),
        ("CUDA", _cuda_line()),
        ("CUDA extension", _cuda_ext_line()),
    ]
    forced = os.environ.get("FASTPEFT_BACKEND", "")
    try:
        dispatch.requested_backend()
        meaning = "forced for every op" if forced.strip().lower() not in ("", "auto") else "automatic choice"
    except BackendError as exc:
        meaning = f"INVALID: {exc}"
    rows.append(("FASTPEFT_BACKEND", f"{forced or '(unset)'}: {meaning}"))
    if dispatch.interpreting():
        rows.append(("TRITON_INTERPRET", "1: a forced triton backend runs the kernels on CPU tensors"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")

    cuda_here = torch.cuda.is_available()
    cpu, cuda = dispatch.explain("cpu"), dispatch.explain("cuda")
    print(f"\nops ({len(registry.OPS)} registered): backend for inputs of the first supported dtype")
    for name, spec in registry.OPS.items():
        dtypes = ", ".join(str(d).replace("torch.", "") for d in spec["dtypes"]) or "any"
        print(f"  {name}: {spec['doc']}" if spec["doc"] else f"  {name}")
        print(f"    Triton dtypes: {dtypes}; CUDA C++ kernel: {'yes' if spec['cuda'] else 'no'}")
        print(f"    cpu tensors:  {cpu[name]}")
        print(f"    cuda tensors: {cuda[name] if cuda_here else 'no CUDA device here; on one: ' + cuda[name]}")

    from fastpeft.ops import strategy

    device = torch.device("cuda" if cuda_here else "cpu")
    print("\nlinear ops on CUDA, Triton backend: fused GEMM or cuBLAS base + adapter kernel (fastpeft/ops/strategy.py)"
          + ("" if cuda_here else "; no CUDA device here: as a device without a table entry"))
    for line in strategy.describe(device):
        print(f"  {line}")
    return 0


# ------------------------------------------------------------------------------------------------------------
# fastpeft bench
# ------------------------------------------------------------------------------------------------------------

def bench_families() -> list[str]:
    """The benchmark families the package ships (fastpeft.bench.FAMILIES), aliases included."""
    from fastpeft import bench

    return bench.families()


def cmd_bench(args: argparse.Namespace) -> int:
    """Run fastpeft.bench.<family>'s main(args)."""
    from fastpeft import bench

    families = bench_families()
    if args.family is None:
        args.parser.print_help()
        return 2
    if args.family not in families:
        print(f"fastpeft bench: unknown benchmark family {args.family!r}; available: {', '.join(families)}.",
              file=sys.stderr)
        return 2
    return int(bench.load(args.family).main(list(args.args)) or 0)


# ------------------------------------------------------------------------------------------------------------
# fastpeft demo
# ------------------------------------------------------------------------------------------------------------

def cmd_demo(args: argparse.Namespace) -> int:
    from fastpeft import demo

    return demo.main(args)


# ------------------------------------------------------------------------------------------------------------
# fastpeft serve
# ------------------------------------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    from fastpeft.serve import launch

    return launch.main(args)


def add_serve_parser(sub) -> None:
    """The `serve` subcommand (its options: fastpeft/serve/launch.py; imports nothing heavy)."""
    from fastpeft.serve import launch

    p = sub.add_parser("serve", help="serve the base model and many adapters over an OpenAI-compatible HTTP API "
                                     "(continuous batching; needs the serve extra)",
                       description=launch.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    launch.add_arguments(p)
    p.set_defaults(func=cmd_serve)


# ------------------------------------------------------------------------------------------------------------
# Parser
# ------------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastpeft", description="fastpeft: fast parameter-efficient fine-tuning.",
                                     epilog="Run `fastpeft <command> --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"fastpeft {_version('fastpeft')}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")

    from fastpeft import demo

    p = sub.add_parser("demo", help="train LoRA on a tiny built-in Llama, merge, generate, time vs PEFT (CPU, ~1 min)",
                       description=demo.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_arguments(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("info", help="versions, and the backend each op uses on this machine and why",
                       description="Versions, CUDA, and for every registered op the backend it would use on CPU "
                                   "and CUDA tensors here, and why.")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("bench", help="run a microbenchmark of an op family (fastpeft/bench/<family>)",
                       description="Run the microbenchmark of an op family; arguments after the family go to it "
                                   "(`fastpeft bench lora --help` shows them). Results go to benchmarks/results under "
                                   "the current directory unless --out says otherwise.",
                       epilog=f"available families: {', '.join(bench_families())}")
    p.add_argument("family", nargs="?", help="the op family to benchmark, e.g. lora")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    p.set_defaults(func=cmd_bench, parser=p)

    add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
