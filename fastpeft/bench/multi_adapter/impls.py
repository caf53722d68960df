"""The implementations the multi-adapter op section times side by side on the same inputs (no bias):

    base              F.linear(x, W), the floor
    fastpeft          fp.ops.multi_lora_linear(x, W, None, bank=LoRABank, adapter_index=Routing): default dispatch
                      (CUDA: at most kernel_options().decode_max_tokens tokens (64) the fused Triton decode kernel,
                      more the segment kernels)
    fastpeft_segment  the same under fp.ops.use_kernel_options(decode_max_tokens=0): the segment kernels forced
                      (decode rows where the default is the decode kernel)
    fastpeft_decode   the same under use_kernel_options(decode_max_tokens=M): the decode kernel forced (decode rows
                      where the default is the segment kernels); with fastpeft_segment it shows where the default
                      threshold is wrong
    fastpeft_cuda     the same under fp.ops.use_backend("cuda"): the CUDA C++ decode kernel (decode rows; dropped
                      with a note where fastpeft.ops.cuda_ext.status() says it cannot load)
    peft              peft.tuners.lora.layer.Linear holding the registered adapters (sharing their storage),
                      layer(x, adapter_names=[name per row, "__base__" for none]): its _mixed_batch_forward
    loop              plain PyTorch: F.linear, then per distinct adapter index_select its tokens, (x Aᵀ) Bᵀ,
                      index_add_ with alpha = s (token groups built outside the timed call)
    padded_bmm        Punica-naive: every registered adapter zero-padded to the largest rank and stacked once at
                      setup (s folded into B, a zero slot for rows without adapter), per call gather A, B per row,
                      two torch.bmm, add to F.linear
train runs base, fastpeft and loop only (PEFT's mixed batch is inference-only). Routing.build (host -> device, once
per forward, shared by every layer) runs outside the timed call; it is timed apart (wall clock + synchronize,
median), the "routing_us" column. Adapters: W (N, K), A_a (r_a, K), B_a (N, r_a), s_a in {1, 1.5, 2} by slot
(alpha = s r), in the benchmark dtype.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from fastpeft.ops import LoRABank, Routing, kernel_options, multi_lora_linear, use_backend, use_kernel_options

from ..devices import synchronize
from ..models import frozen_linear, takes_config

IMPLS = ("base", "fastpeft", "fastpeft_segment", "fastpeft_decode", "fastpeft_cuda", "peft", "loop", "padded_bmm")
FAST_IMPLS = ("fastpeft", "fastpeft_segment", "fastpeft_decode", "fastpeft_cuda")
TRAIN_IMPLS = ("base", "fastpeft", "loop")


def build_peft_layer(peft_linear, w, a, b, scales) -> nn.Module:
    """PEFT's lora.Linear around nn.Linear(K, N, bias=False) sharing w, holding adapter "a<i>" = (a[i], b[i]) with
    scaling s_i (lora_alpha = s_i r_i), their storage shared."""
    base = frozen_linear(w)
    layer = None
    with torch.device(w.device):  # PEFT allocates (and discards) its own A, B: do it on the device, quickly
        for i, (ai, bi, s) in enumerate(zip(a, b, scales)):
            name, r = f"a{i}", ai.shape[0]
            alpha = s * r
            if takes_config(peft_linear):
                from peft import LoraConfig

                config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, init_lora_weights=False)
                if layer is None:
                    layer = peft_linear(base, adapter_name=name, config=config, r=r, lora_alpha=alpha)
                else:
                    layer.update_layer(name, r, lora_alpha=alpha, config=config)
            else:  # PEFT < 0.18: keyword arguments
                kw = dict(lora_dropout=0.0, init_lora_weights=False)
                if layer is None:
                    layer = peft_linear(base, adapter_name=name, r=r, lora_alpha=alpha, **kw)
                else:
                    layer.update_layer(name, r, lora_alpha=alpha, **kw)
            layer.lora_A[name].weight = nn.Parameter(ai.detach(), requires_grad=False)
            layer.lora_B[name].weight = nn.Parameter(bi.detach(), requires_grad=False)
    layer.base_layer.weight.requires_grad_(False)
    return layer.eval()


def padded_stacks(a, b, scales) -> tuple[torch.Tensor, torch.Tensor]:
    """Every adapter zero-padded to the largest rank R and stacked, plus a zero slot S for rows without adapter:
    A_pad (S + 1, R, K), B_pad (S + 1, N, R) with the scale folded in."""
    R = max(t.shape[0] for t in a)
    K, N = a[0].shape[1], b[0].shape[0]
    a_pad = a[0].new_zeros(len(a) + 1, R, K)
    b_pad = b[0].new_zeros(len(a) + 1, N, R)
    with torch.no_grad():
        for i, (ai, bi, s) in enumerate(zip(a, b, scales)):
            a_pad[i, :ai.shape[0]] = ai
            b_pad[i, :, :ai.shape[0]] = bi * s
    return a_pad, b_pad


def make_item(spec: dict, slot_info: dict, impls, dtype, device, peft_linear) -> dict:
    """One set of inputs: x (B, L, K) ~ N(0, 1); W, A ~ N(0, 1/K); B ~ N(0, 1/r) (non-zero); in train a fixed dY;
    its own LoRABank, PEFT layer and padded stacks over its own adapters."""
    K, N, B, L, grad = spec["K"], spec["N"], spec["B"], spec["L"], spec["phase"] == "train"

    def randn(*shape, std=1.0, requires_grad=False):
        return torch.randn(*shape, device=device, dtype=dtype).mul_(std).requires_grad_(requires_grad)

    ranks, scales = slot_info["ranks"], slot_info["scales"]
    item = {"x": randn(B, L, K, requires_grad=grad), "w": randn(N, K, std=K**-0.5),
            "a": [randn(r, K, std=K**-0.5, requires_grad=grad) for r in ranks],
            "b": [randn(N, r, std=r**-0.5, requires_grad=grad) for r in ranks]}
    if grad:
        item["dy"] = randn(B, L, N)
    if set(FAST_IMPLS) & set(impls):
        item["bank"] = LoRABank(item["a"], item["b"], scales)  # points at the same tensors (no bytes counted twice)
    if "peft" in impls:
        item["peft"] = build_peft_layer(peft_linear, item["w"], item["a"], item["b"], scales)
    if "padded_bmm" in impls:
        item["a_pad"], item["b_pad"] = padded_stacks(item["a"], item["b"], scales)
    return item


def forward(impl: str, item: dict, ctx: dict) -> torch.Tensor:
    x, w = item["x"], item["w"]
    if impl == "base":
        return F.linear(x, w)
    if impl == "fastpeft":
        return multi_lora_linear(x, w, None, bank=item["bank"], adapter_index=ctx["routing"])
    if impl in ("fastpeft_segment", "fastpeft_decode"):
        with use_kernel_options(decode_max_tokens=0 if impl == "fastpeft_segment" else x.shape[0] * x.shape[1]):
            return multi_lora_linear(x, w, None, bank=item["bank"], adapter_index=ctx["routing"])
    if impl == "fastpeft_cuda":
        with use_backend("cuda"):
            return multi_lora_linear(x, w, None, bank=item["bank"], adapter_index=ctx["routing"])
    if impl == "peft":
        return item["peft"](x, adapter_names=ctx["peft_names"])
    if impl == "loop":
        B, L, K = x.shape
        x2 = x.reshape(-1, K)
        y = F.linear(x2, w)
        for slot, rows in ctx["groups"]:
            t = x2.index_select(0, rows) @ item["a"][slot].t()
            y.index_add_(0, rows, t @ item["b"][slot].t(), alpha=ctx["scales"][slot])
        return y.reshape(B, L, -1)
    if impl == "padded_bmm":
        a_g = item["a_pad"].index_select(0, ctx["pad_index"])  # (B, R, K)
        b_g = item["b_pad"].index_select(0, ctx["pad_index"])  # (B, N, R)
        return F.linear(x, w) + torch.bmm(torch.bmm(x, a_g.transpose(1, 2)), b_g.transpose(1, 2))
    raise ValueError(f"unknown implementation {impl!r}")


def grad_inputs(impl: str, item: dict, used: list[int]) -> list[torch.Tensor]:
    """What train differentiates: x (base); x, then A and B of every used adapter (fastpeft, loop)."""
    if impl == "base":
        return [item["x"]]
    return [item["x"], *(item["a"][s] for s in used), *(item["b"][s] for s in used)]


def reference_outputs(item: dict, ctx: dict, ref_dtype: torch.dtype, train: bool) -> dict:
    """The formula in ref_dtype: {"base": [y, (dX)], "multi": [y, (dX, dA of each used slot, dB of each)]}."""
    x, w = item["x"].detach(), item["w"].to(ref_dtype)
    B, L, K = x.shape
    x2 = x.reshape(-1, K).to(ref_dtype)
    y_base = x2 @ w.t()
    y = y_base.clone()
    ts = {}
    for slot, rows in ctx["groups"]:  # token indices on the device
        a, b = item["a"][slot].detach().to(ref_dtype), item["b"][slot].detach().to(ref_dtype)
        ts[slot] = x2[rows] @ a.t()
        y[rows] += ctx["scales"][slot] * (ts[slot] @ b.t())
    out = {"base": [y_base.reshape(B, L, -1)], "multi": [y.reshape(B, L, -1)]}
    if train:
        dy = item["dy"].reshape(-1, w.shape[0]).to(ref_dtype)
        dx_base = dy @ w
        dx, da, db = dx_base.clone(), [], []
        for slot, rows in ctx["groups"]:
            a, b = item["a"][slot].detach().to(ref_dtype), item["b"][slot].detach().to(ref_dtype)
            s = ctx["scales"][slot]
            g = dy[rows] @ b
            dx[rows] += s * (g @ a)
            da.append(s * (g.t() @ x2[rows]))
            db.append(s * (dy[rows].t() @ ts[slot]))
        out["base"].append(dx_base.reshape(B, L, K))
        out["multi"] += [dx.reshape(B, L, K), *da, *db]
    return out


def case_impls(impls, phase: str, M: int) -> list[str]:
    """The impls that run in a case: train only base/fastpeft/loop; the forced fastpeft kernels at decode only, where
    they differ from the default."""
    if phase == "train":
        return [i for i in impls if i in TRAIN_IMPLS]
    decode_kernel = M <= kernel_options().decode_max_tokens
    skip = {"fastpeft_segment": phase != "decode" or not decode_kernel,
            "fastpeft_decode": phase != "decode" or decode_kernel, "fastpeft_cuda": phase != "decode"}
    return [i for i in impls if not skip.get(i, False)]


def routing_us(slots: list[int], num_slots: int, device: torch.device, L: int, reps: int) -> float:
    """Median wall-clock time of Routing.build (including its host-to-device copy) in microseconds."""
    def build():
        Routing.build(slots, num_slots, device, tokens_per_slot=L)
        synchronize(device)

    build()
    build()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        build()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)
