"""LoRA on mixture-of-experts expert tensors: one experts module (the fused 3-D gate_up_proj and down_proj of a
transformers MoE layer) with its routing given, forward and forward+backward, fastpeft against PEFT and the base.

    fastpeft bench moe                   # CUDA: Mixtral (E 8, H 4096, I 14336, top-2) and Qwen3-MoE (E 128, H 2048,
                                         # I 768, top-8) experts, 4096 tokens, r 16, bf16 (CPU: reduced sizes)
    fastpeft bench moe --quick           # tiny experts, seconds (the default without CUDA)
    fastpeft bench moe --layers mixtral --tokens 1024 --rank 8 --modes fwd+bwd

One layer: tokens x (T, H), each routed to its top-k experts (softmax of random router logits, renormalised), so
P = T·k (token, expert) pairs; per expert e: y_e = down_e(act(gate_e(x)) ⊙ up_e(x)), weighted and summed per token.
LoRA (r, alpha = 2r) on both tensors, PEFT's layout (A (r·E, in), B (out, r·E), random: init_lora_weights=False):
    base      the experts module alone (transformers' grouped experts forward), no adapter: the floor
    fastpeft  fastpeft's LoRAExperts: the base product plus s·(x A_eᵀ) B_eᵀ per expert group, B_e A_e never formed
              (CUDA: the segment kernels, slot = expert, added in place into the base product)
    peft      PEFT's target_parameters (ParamWrapper): W_e + s·B_e A_e materialised for every expert on every call,
              then the base forward on it
The three share the base weights; fastpeft holds a copy of PEFT's adapter. Modes: "fwd" (torch.no_grad) and
"fwd+bwd" (forward, then torch.autograd.grad of a fixed dY for x and the adapters' A and B; base: x only).
FLOPs (useful work): base fwd 6·P·H·I (gate_up 2·P·H·2I, down 2·P·I·H); the adapter adds 2·P·r·(H + 2I) +
2·P·r·(I + H); fwd+bwd: base 2x its forward (dX; frozen weights), the adapter 3x its forward (dX, dA, dB).
Bytes (minimum traffic): the expert weights read once per pass (3·E·H·I elements), x and y once, the adapters once.
rel_err (fastpeft rows): fastpeft's output and gradients (x, every A and B) against PEFT's, same dtype.
"""
from __future__ import annotations

import argparse
import math

import torch
from torch import nn

from . import driver
from .checks import max_rel_err
from .devices import failure_note, free_memory
from .driver import Run, Section
from .optional import importable_impls
from .options import str_list
from .report import Column, print_pivot
from .roofline import Row, fill_metrics
from .timing import time_ms

BENCH = "moe"
IMPLS = ("base", "fastpeft", "peft")
MODES = {"fwd": "fwd", "forward": "fwd", "fwd+bwd": "fwd+bwd", "fwdbwd": "fwd+bwd", "train": "fwd+bwd"}
TARGETS = ["experts.gate_up_proj", "experts.down_proj"]
LAYERS = {  # name -> experts class family, E, H, I (per expert), top-k
    "full": {"mixtral": ("mixtral", 8, 4096, 14336, 2), "qwen3_moe": ("qwen3_moe", 128, 2048, 768, 8)},
    "cpu": {"mixtral": ("mixtral", 8, 512, 1792, 2), "qwen3_moe": ("qwen3_moe", 64, 256, 96, 8)},
    "quick": {"mixtral": ("mixtral", 4, 64, 96, 2), "qwen3_moe": ("qwen3_moe", 8, 32, 24, 4)},
}
TOKENS = {"full": 4096, "cpu": 512, "quick": 16}
RANK = {"full": 16, "cpu": 16, "quick": 4}
CHECK_TOL = {torch.float32: 1e-4}  # else 5e-2: two half-precision computations (PEFT rounds W + ΔW) apart


# ------------------------------------------------------------------------------------------------------------
# Cost model
# ------------------------------------------------------------------------------------------------------------

def moe_flops(P: int, H: int, I: int, r: int, mode: str, impl: str) -> float:
    """Useful flops of one call over P (token, expert) pairs (formulas in the module docstring)."""
    base = 6.0 * P * H * I
    term = 0.0 if impl == "base" else 2.0 * P * r * (H + 2 * I) + 2.0 * P * r * (I + H)
    return base + term if mode == "fwd" else 2 * base + 3 * term


def moe_bytes(T: int, E: int, H: int, I: int, r: int, mode: str, impl: str, elem: int, adapter_elem: int) -> float:
    """Minimum traffic of one call: expert weights, x and y once per pass; the adapters once (and their grads)."""
    weights = 3.0 * E * H * I * elem
    adapters = 0.0 if impl == "base" else adapter_elem * r * E * (H + 2 * I + I + H)
    fwd = weights + elem * 2.0 * T * H + adapters
    return fwd if mode == "fwd" else fwd + weights + elem * 2.0 * T * H + 2 * adapters


# ------------------------------------------------------------------------------------------------------------
# The three implementations on shared weights
# ------------------------------------------------------------------------------------------------------------

class Holder(nn.Module):
    """The experts module as PEFT sees a model: a parent with `experts` (target_parameters names experts.*)."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.experts = experts

    def forward(self, hidden, top_k_index, top_k_weights):
        return self.experts(hidden, top_k_index, top_k_weights)


def experts_class(family: str, E: int, H: int, I: int, k: int):
    """(transformers' experts class, its config) of `family` with E experts of H -> I -> H."""
    import transformers as tf

    if family == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts

        return MixtralExperts, tf.MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E,
                                                num_experts_per_tok=k)
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    return Qwen3MoeExperts, tf.Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E,
                                              num_experts_per_tok=k)


def build(family: str, E: int, H: int, I: int, k: int, r: int, dtype, device, seed: int) -> dict:
    """impl -> callable module (hidden, top_k_index, top_k_weights), all on one set of expert weights (N(0, 1/in),
    frozen), PEFT's random adapter copied into fastpeft's; "params": impl -> the adapter parameters."""
    import peft

    from fastpeft.inject.families import experts_layout
    from fastpeft.modules.moe_lora import LoRAExperts

    cls, config = experts_class(family, E, H, I, k)
    g = torch.Generator(device=device).manual_seed(seed)  # drawn on the device: Mixtral's experts are 1.4G weights

    def sharing(weights):
        """An experts module built on the meta device, then given `weights` (shared, never copied)."""
        with torch.device("meta"):
            module = cls(config)
        for pname, w in weights.items():
            setattr(module, pname, w)
        return module

    shapes = {pname: tuple(p.shape) for pname, p in sharing({}).named_parameters(recurse=False)}
    weights = {pname: nn.Parameter(torch.randn(shape, generator=g, device=device, dtype=dtype).div_(
        math.sqrt(shape[-1])), requires_grad=False) for pname, shape in shapes.items()}
    base = sharing(weights)
    theirs = peft.get_peft_model(Holder(sharing(weights)), peft.LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=[], target_parameters=TARGETS, init_lora_weights=False))
    ours = LoRAExperts(sharing(weights), experts_layout(base))
    ours.add_adapter("default", {"gate_up_proj": (r, 2 * r), "down_proj": (r, 2 * r)})
    ours.active_adapters = ["default"]
    outer = theirs.base_model.model.experts  # PEFT nests one ParamWrapper per tensor: down_proj's outside
    wrappers = {"down_proj": outer, "gate_up_proj": outer.base_layer}
    params = {"base": [], "fastpeft": [], "peft": []}
    with torch.no_grad():
        for pname, wrapper in wrappers.items():
            for table, theirs_table in ((ours.lora_A, wrapper.lora_A), (ours.lora_B, wrapper.lora_B)):
                src = theirs_table["default"].weight
                table[pname]["default"].copy_(src.to(table[pname]["default"].dtype))
                params["fastpeft"].append(table[pname]["default"])
                params["peft"].append(src)
    return {"modules": {"base": base, "fastpeft": ours, "peft": theirs}, "params": params}


def routing(T: int, E: int, k: int, H: int, dtype, device, seed: int) -> dict:
    """x (T, H) ~ N(0, 1) with gradients, top-k experts per token of random router logits and their renormalised
    softmax weights, dY ~ N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    weights, index = torch.topk(torch.softmax(logits, dim=-1), k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    return {"x": torch.randn(T, H, generator=g).to(device, dtype).requires_grad_(),
            "index": index.to(device), "weights": weights.to(device, dtype),
            "dy": torch.randn(T, H, generator=g).to(device, dtype)}


def step(module, params: list, item: dict, mode: str) -> list[torch.Tensor]:
    """One call: [y] (fwd, no grad), or [y, dX, *grads of params] (fwd+bwd, autograd.grad: nothing accumulates)."""
    if mode == "fwd":
        with torch.no_grad():
            return [module(item["x"], item["index"], item["weights"])]
    y = module(item["x"], item["index"], item["weights"])
    return [y, *torch.autograd.grad(y, [item["x"], *params], item["dy"])]


# ------------------------------------------------------------------------------------------------------------
# Run
# ------------------------------------------------------------------------------------------------------------

def run_layer(run: Run, name: str, dims: tuple, tokens: int, rank: int) -> list[Row]:
    """Check and time every (mode, impl) of one experts layer."""
    family, E, H, I, k = dims
    device, dtype = run.device, run.dtype
    case = {"layer": name, "E": E, "H": H, "I": I, "top_k": k, "tokens": tokens, "r": rank}
    adapter_elem = 4 if dtype in (torch.float16, torch.bfloat16) else torch.empty((), dtype=dtype).element_size()

    def new_row(mode, impl, ms=None, note="", rel_err=None):
        return Row(BENCH, case, mode, impl, ms, moe_flops(tokens * k, H, I, rank, mode, impl),
                   moe_bytes(tokens, E, H, I, rank, mode, impl, run.elem, adapter_elem), rel_err=rel_err, note=note)

    try:
        built = build(family, E, H, I, k, rank, dtype, device, run.args.seed)
        item = routing(tokens, E, k, H, dtype, device, run.args.seed)
    except Exception as exc:  # typically out of memory: recorded, the next layer runs
        free_memory(device)
        note = failure_note(exc, " building")
        print(f"  {name}: {note}", flush=True)
        return [new_row(mode, impl, note=note) for mode in run.args.modes for impl in run.impls]
    modules, params = built["modules"], built["params"]
    rows = []
    for mode in run.args.modes:
        checks = {}
        if not run.args.no_check and {"fastpeft", "peft"} <= set(run.impls):
            try:
                ours = step(modules["fastpeft"], params["fastpeft"], item, mode)
                theirs = step(modules["peft"], params["peft"], item, mode)
                checks["fastpeft"] = max_rel_err([o.detach().float() for o in ours],
                                                 [t.detach().float() for t in theirs])
                del ours, theirs
            except Exception as exc:
                print(f"  {name} {mode}: check failed: {failure_note(exc)}", flush=True)
        for impl in run.impls:
            note, ms = "", None
            err = checks.get(impl)
            if err is not None and not err <= CHECK_TOL.get(dtype, 5e-2):
                note = f"MISMATCH rel_err {err:.1e} vs PEFT"
            try:
                ms = time_ms(lambda: step(modules[impl], params[impl], item, mode), device, run.timer)
            except Exception as exc:
                note = failure_note(exc)
                print(f"  {name} {mode} {impl}: {note}", flush=True)
                free_memory(device)
            rows.append(new_row(mode, impl, ms, note, err))
    fill_metrics(rows, run.peaks, base="base", peer="peft")
    del built, modules, params, item
    free_memory(device)
    return rows


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=str_list, default=None,
                   help=f"experts layers, comma-separated, of {','.join(LAYERS['full'])} (default: all)")
    p.add_argument("--tokens", type=int, default=None,
                   help=f"tokens per call (default: CUDA {TOKENS['full']}, CPU {TOKENS['cpu']}, "
                        f"quick {TOKENS['quick']})")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank r (alpha = 2r; default 16, quick 4)")


def prepare(run: Run) -> tuple[str, dict]:
    preset = "quick" if run.quick else ("full" if run.cuda else "cpu")
    names = run.args.layers or list(LAYERS[preset])
    unknown = [n for n in names if n not in LAYERS[preset]]
    if unknown:
        raise SystemExit(f"fastpeft bench moe: unknown layer(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(LAYERS[preset])}")
    tokens = run.args.tokens or TOKENS[preset]
    rank = run.args.rank or RANK[preset]
    layers = {n: LAYERS[preset][n] for n in names}
    run.ctx.update(preset=preset, layers=layers, tokens=tokens, rank=rank)
    config = {"preset": preset, "layers": {n: dict(zip(("family", "E", "H", "I", "top_k"), d))
                                           for n, d in layers.items()},
              "tokens": tokens, "rank": rank, "alpha": "2r", "targets": TARGETS, "modes": run.args.modes,
              "impls": run.impls, "ratio": "vs_base = ms / ms(base); vs_peer = ms(peft) / ms"}
    shapes = ", ".join(f"{n} (E {d[1]}, H {d[2]}, I {d[3]}, top-{d[4]})" for n, d in layers.items())
    banner = f"experts layers {shapes}; {tokens} tokens, LoRA r{rank} on gate_up_proj and down_proj"
    return banner, {"config": config}


def columns() -> list[Column]:
    return [Column("layer", "layer", 9), Column("mode", "mode", 7), Column("impl", "impl", 8),
            Column("ms", "ms", 10, ".3f"), Column("vs_base", "x base", 7, ".2f"), Column("vs_peer", "peft/x", 7, ".2f"),
            Column("tflops", "TFLOP/s", 8, ".2f"), Column("roofline_pct", "%roof", 6, ".1f"),
            Column("rel_err", "rel_err", 8, ".1e"), Column("note", "note", 4)]


def run_all(run: Run) -> None:
    have = importable_impls(["peft", "transformers"], {"peft": "peft", "transformers": "transformers"}, "peft",
                            run.notes, "moe: the experts modules and the comparison need")
    if have != ["peft", "transformers"]:
        return
    table = run.table(columns())
    for name, dims in run.ctx["layers"].items():
        run.record("rows", run_layer(run, name, dims, run.ctx["tokens"], run.ctx["rank"]), table)
    run.write()


def report(run: Run) -> None:
    rows = run.payload.get("rows") or []
    if not rows:
        return
    print()
    print_pivot(rows, row_keys=("layer", "mode"), col_key="impl", value_key="vs_base", fmt=".3f",
                title="time / the base experts module's (target: fastpeft fwd+bwd <= 1.15):")
    print_pivot(rows, row_keys=("layer", "mode"), col_key="impl", value_key="vs_peer", fmt=".3f",
                title="PEFT's time / each implementation's (target: fastpeft >= 2):")


SECTION = Section(modes=("fwd", "fwd+bwd"), run=run_all, report=report)
FAMILY = driver.Benchmark(bench=BENCH, title="LoRA on MoE expert tensors", doc=__doc__, impls=IMPLS, modes=MODES,
                          modes_help="fwd,fwd+bwd (default: both)", sections=(SECTION,), prepare=prepare,
                          plot=lambda run: None, options=options)


def main(argv=None) -> int:
    return driver.main(FAMILY, argv)
