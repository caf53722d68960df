"""The 4-bit sections: LoRA on a bitsandbytes NF4 weight (double quantization, blocksize 64, bf16 compute).

lora_4bit, one layer, forward ("fwd") and forward+backward ("fwd+bwd": autograd.grad of a fixed dY for x, A, B)
through grid.time_case, on the Llama-shaped linears over the M grid (its fwd+bwd rows choose the strategy table's
entries for lora_linear_4bit):
    base       bitsandbytes' Linear4bit forward (its own 4-bit product), the floor of the 4-bit layer
    fused      fp.ops.lora_linear_4bit under linear_strategy="fused": the packed weight read inside the GEMM
    cublas     the same op under "cublas": bitsandbytes dequantizes, then cuBLAS and the adapter kernel
    peft       PEFT's lora.bnb.Linear4bit around the same Linear4bit
    bf16_lora  fp.ops.lora_linear on the dequantized bf16 W (the issue's yardstick for the 4-bit layer)
    y = x Ŵᵀ + s (x Aᵀ) Bᵀ, s = 2; the reference is the formula in float32 on Ŵ, the dequantized weight.
Cost model: flops as LoRA's (fastpeft/bench/lora.py); bytes with W at 4 bits plus one uint8 absmax per 64 weights
(bf16_lora: W at 2 bytes): the minimum traffic of the formula, which the dequantize-first paths exceed.

qlora, the whole model: `fastpeft bench qlora` (fastpeft/bench/qlora.py) on a Llama-shaped model, its two 4-bit
strategies, PEFT's QLoRA and LoRA on the bf16 base, training step and inference forward, training and decode-sized
token shapes, with the weights and the step's peak memory of each.
"""
from __future__ import annotations

import functools
import importlib.util
import tempfile

import torch

from .. import lora, qlora
from ..grid import time_case
from ..optional import load
from .context import STRATEGIES, Check
from .linear import section_columns, strategy_hooks

IMPLS = ("base", *STRATEGIES, "peft", "bf16_lora")
SCALE = 2.0  # alpha / r with alpha = 2r
BLOCKSIZE = 64


def skipped(check: Check, section: str) -> bool:
    """Whether `section` cannot run here (bitsandbytes, PEFT or transformers missing): then noted and recorded."""
    missing = [m for m in ("bitsandbytes", "peft", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        check.note(f"{section}: skipped, {', '.join(missing)} not installed here")
        check.section(section, {**getattr(check.plan, section), "skipped": f"{', '.join(missing)} not installed"})
    return bool(missing)


def make_item(M: int, K: int, N: int, r: int, dtype, device, peft_linear) -> dict:
    """lora.make_item's inputs with W quantized by bitsandbytes (NF4, double quantization) in a Linear4bit: "lin"
    (the layer), "w4" (its packed weight as fastpeft's op takes it) and "w" replaced by the dequantized W."""
    import bitsandbytes as bnb

    from fastpeft.modules.base_layers import packed_4bit

    item = lora.make_item(M, K, N, r, dtype, device, need_dy=True)
    lin = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(item["w"].detach().cpu(), requires_grad=False, compress_statistics=True,
                                   quant_type="nf4", blocksize=BLOCKSIZE)
    lin = lin.to(device)  # bitsandbytes quantizes on the move
    data, state = lin.weight.data, lin.weight.quant_state
    item.update(lin=lin, w4=packed_4bit(data, state), w=bnb.functional.dequantize_4bit(data, state).to(dtype))
    if peft_linear is not None:
        item["peft"] = lora.build_peft_layer(peft_linear, item["w"], item["a"], item["b"], r, 2 * r, dtype, base=lin)
    return item


def forward(impl: str, item: dict) -> torch.Tensor:
    from fastpeft.ops import lora_linear, lora_linear_4bit

    x, a, b = item["x"], item["a"], item["b"]
    if impl == "base":
        return item["lin"](x)
    if impl == "fastpeft":
        return lora_linear_4bit(x, item["w4"], None, a, b, SCALE)
    if impl == "bf16_lora":
        return lora_linear(x, item["w"], None, a, b, SCALE)
    return lora.forward(impl, item, SCALE)


def grad_inputs(impl: str, item: dict) -> list[torch.Tensor]:
    return lora.grad_inputs("fastpeft" if impl == "bf16_lora" else impl, item)


def reference(item: dict, ref_dtype) -> dict:
    """The formula on the dequantized W: the 4-bit impls' and bf16_lora's outputs and gradients alike."""
    out = lora.reference_outputs(item, SCALE, ref_dtype)
    return {"base": out["base"], "lora_4bit": out["lora"]}


def nf4_bytes(M: int, K: int, N: int, r: int, mode: str, impl: str, elem: int) -> float:
    """Minimum traffic: W at 4 bits + 1/64 byte of absmax per weight (bf16_lora: 2 bytes), x, y (dY, dX) at elem."""
    w = 2.0 * N * K if impl == "bf16_lora" else N * K * (0.5 + 1.0 / BLOCKSIZE)
    adapters = 0 if impl == "base" else elem * (r * K + N * r)
    fwd = elem * (M * K + M * N) + w + adapters
    return fwd if mode == "fwd" else fwd + elem * (M * N + M * K) + w + 2 * adapters


def lora_4bit_case(check: Check, run, K: int, N: int, M: int, r: int) -> list:
    fwd, grads = strategy_hooks(check, forward, grad_inputs)
    ref_dtype = torch.float64 if not check.cuda else torch.float32
    return time_case(
        run, K, N, M, r, make_item=lambda: make_item(M, K, N, r, check.dtype, check.device, run.peft),
        reference=functools.partial(reference, ref_dtype=ref_dtype), forward=fwd, grad_inputs=grads,
        cost=lambda mode, impl: (lora.lora_flops(M, K, N, r, mode, impl),
                                 nf4_bytes(M, K, N, r, mode, impl, run.elem)))


def run_lora_4bit(check: Check) -> None:
    if skipped(check, "lora_4bit"):
        return
    plan = check.plan.lora_4bit
    peft, why = load("peft.tuners.lora.bnb", "Linear4bit")
    impls = [i for i in IMPLS if i != "peft" or peft is not None]
    if why:
        check.note(f"lora_4bit: peft skipped: {why}")
    run = check.run_for("lora_4bit", impls, axis="r", peft=peft)
    cases = [(K, N, M, r) for r in plan["ranks"] for M in plan["m"] for K, N in plan["shapes"]]
    config = {**plan, "impls": impls, "peft": "peft.tuners.lora.bnb.Linear4bit", "alpha": "2r", "bias": False,
              "quantization": f"bitsandbytes NF4, double quantization, blocksize {BLOCKSIZE}",
              "strategies": {s: f"use_kernel_options(linear_strategy={s!r})" for s in STRATEGIES}}
    check.run_cases("lora_4bit", config, cases, lambda c: lora_4bit_case(check, run, *c),
                    lambda c: "K={} N={} M={} r={}".format(*c), section_columns("r", False))


def run_qlora(check: Check) -> None:
    if skipped(check, "qlora"):
        return
    plan = check.plan.qlora
    from ..models import random_llama

    dims = plan["dims"]
    with check.dispatch():
        impls = qlora.impls_here(check.device, qlora.IMPLS)
    run = check.run_for("qlora", impls, ctx={"dims": dims, "modes": ["train", "infer"]})
    with tempfile.TemporaryDirectory(prefix="fastpeft-gpu-check-") as folder:
        random_llama({**dims, "kv_heads": dims["heads"]}, 512, torch.bfloat16, torch.device("cpu"), 0
                     ).save_pretrained(folder)
        check.run_cases("qlora", {**plan, "impls": impls, "model": "LlamaForCausalLM, random weights"},
                        plan["tokens"], lambda tokens: qlora.run_shape(run, folder, tokens), str, qlora.columns())
