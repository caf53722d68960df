"""`fp.ops.multi_lora_linear`: a LoRA linear whose tokens use different adapters, with autograd.

    y_m = x_m Wᵀ + b + ((h_m A_aᵀ) ⊙ s_a) B_aᵀ       a = adapter of token m (none: y_m = x_m Wᵀ + b)

(math and backward: fastpeft/reference/multi_lora.py). Adapters are given by slot, as lists (lora_a[i], lora_b[i],
scale[i]; None for an empty slot) or as a `LoRABank` built once; each keeps its own tensors of its own rank, which
the kernels read through a pointer table. Which adapter each token uses is an index tensor (one per token, or one
per row of a 3-D x; -1: none) or a `Routing` (fastpeft/ops/routing.py) built once per batch and shared by layers.

Backends: on CUDA the base product runs on cuBLAS and the low-rank term on the kernels of
fastpeft/kernels/multi_lora.py — at most `fp.ops.kernel_options().decode_max_tokens` tokens (decode) one fused
shrink+expand launch per layer, gathered per token; more tokens (prefill, training) the segment kernels (shrink,
expand), tokens grouped by adapter. However many distinct adapters the batch holds, a layer costs cuBLAS + 1 or 2
launches forward and cuBLAS + at most 6 launches backward. FASTPEFT_BACKEND=cuda runs the CUDA C++ decode kernel
(csrc/) instead of the Triton one. Elsewhere (CPU) the reference, differentiable by autograd. Gradients reach A
and B of the adapters the batch uses (a row never touches another row's adapter); scales get none.

Why a plain `torch.autograd.Function`, not a registered `torch.library` op like the single-adapter ops: its
inputs are a LoRABank (a pointer table of raw data addresses) and a Routing (host-side per-batch segment lists).
As a registered op those would become host integer lists in the schema, so torch.compile would recompile for
every batch composition, and fake tensors have no addresses to build a pointer table from. Multi-adapter batches
run eagerly by design (the modules call this op outside torch.compile's graph).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import BackendError, InputError
from ..kernels.limits import MULTI_LORA_DECODE_MAX_RANK, TRITON_DTYPES
from ..reference import multi_lora as reference
from . import dispatch, registry
from ._common import autocast, base_product, check_linear, target_programs
from .routing import Routing, pointer_table

registry.describe("multi_lora_linear", dtypes=TRITON_DTYPES, cuda=True,
                  doc="y_m = x_m W^T + b + s_a (h_m A_a^T) B_a^T, a = the adapter of token m",
                  note=f"<= {dispatch.KernelOptions().decode_max_tokens} tokens (kernel option decode_max_tokens): "
                       "fused shrink+expand decode kernel (FASTPEFT_BACKEND=cuda: the CUDA C++ one); more: segment "
                       "kernels; base product on cuBLAS")


def _kernels():
    from ..kernels import multi_lora  # imported on first CUDA call only: `import fastpeft` never loads triton

    return multi_lora


class LoRABank:
    """The LoRA adapters of one linear layer by slot: A_i (r_i, K), B_i (N, r_i), per-rank scale s_i (r_i,)
    float32, or None for an empty slot. Kernels read them in place through `table` (3, S) int64 and `ranks` (S,)
    int32; the bank keeps a reference to every tensor it points to."""

    def __init__(self, lora_a: Sequence[Tensor | None], lora_b: Sequence[Tensor | None],
                 scale: Sequence[float | Tensor | None] | float, *, where: str = "multi_lora_linear"):
        if not (len(lora_a) == len(lora_b)) or (not isinstance(scale, (int, float)) and len(scale) != len(lora_a)):
            raise InputError(f"{where}: lora_a, lora_b and scale must list the same slots (got {len(lora_a)}, "
                             f"{len(lora_b)} and {1 if isinstance(scale, (int, float)) else len(scale)} entries); give "
                             "one entry per slot in each (None for an empty slot).")
        scales = [scale] * len(lora_a) if isinstance(scale, (int, float)) else list(scale)
        self.a: list[Tensor | None] = []
        self.b: list[Tensor | None] = []
        self.s: list[Tensor | None] = []
        self.in_features = self.out_features = self.dtype = self.device = None
        for i, (a, b, s) in enumerate(zip(lora_a, lora_b, scales)):
            if (a is None) != (b is None):
                raise InputError(f"{where}: slot {i} has {'lora_b' if a is None else 'lora_a'} but not the other; "
                                 "give both, or None for both (an empty slot).")
            if a is None:
                self.a.append(None)
                self.b.append(None)
                self.s.append(None)
                continue
            self._check_slot(i, a, b, where)
            r = a.shape[0]
            self.a.append(a.contiguous())
            self.b.append(b.contiguous())
            self.s.append(_rank_scale(s, r, a.device, i, where))
        self.ranks_host = [0 if a is None else a.shape[0] for a in self.a]
        self.max_rank = max(self.ranks_host, default=0)
        device = self.device or torch.device("cpu")
        self.table = pointer_table([self.a, self.b, self.s], device)
        self.ranks = torch.tensor(self.ranks_host, dtype=torch.int32).to(device)

    def _check_slot(self, i: int, a: Tensor, b: Tensor, where: str) -> None:
        if a.dim() != 2 or a.shape[0] < 1 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise InputError(f"{where}: slot {i} has lora_a {tuple(a.shape)} and lora_b {tuple(b.shape)}; expected "
                             "(r, in_features) and (out_features, r) with r >= 1.")
        if not a.dtype.is_floating_point or a.dtype != b.dtype:
            raise InputError(f"{where}: slot {i} has lora_a {a.dtype} and lora_b {b.dtype}; both must be one floating "
                             "dtype: cast them, e.g. .float().")
        if self.dtype is None:
            self.in_features, self.out_features, self.dtype, self.device = a.shape[1], b.shape[0], a.dtype, a.device
        if (a.shape[1], b.shape[0]) != (self.in_features, self.out_features):
            raise InputError(f"{where}: slot {i} maps {a.shape[1]} -> {b.shape[0]} features, the first adapter "
                             f"{self.in_features} -> {self.out_features}; every slot adapts the same layer: pass "
                             "adapters made for it.")
        if a.dtype != self.dtype:
            raise InputError(f"{where}: slot {i} is {a.dtype} and the first adapter {self.dtype}; keep one adapter "
                             "dtype per layer (cast the adapters).")
        if a.device != self.device or b.device != self.device:
            raise InputError(f"{where}: slot {i} is on {a.device}, the first adapter on {self.device}; move them "
                             "together.")

    @property
    def num_slots(self) -> int:
        return len(self.a)

    def slots_used(self, routing: Routing) -> list[int]:
        """The slots of `routing`'s segments that hold an adapter here."""
        return [s for s in routing.seg_slot_host if s < len(self.a) and self.a[s] is not None]


def _rank_scale(s, r: int, device, i: int, where: str) -> Tensor:
    if s is None:
        raise InputError(f"{where}: slot {i} holds an adapter but no scale; pass a number or an (r,) tensor.")
    if isinstance(s, Tensor):
        if s.shape != (r,) or not s.dtype.is_floating_point or s.device != device:
            raise InputError(f"{where}: slot {i}'s scale has shape {tuple(s.shape)} ({s.dtype}, {s.device}); expected "
                             f"a floating ({r},) tensor on {device}, one entry per rank.")
        if s.requires_grad and torch.is_grad_enabled():
            raise InputError(f"{where}: slot {i}'s scale requires grad; multi-adapter batches give scales no "
                             "gradient (train such adapters one at a time, or detach the scale).")
        return s.detach().to(torch.float32).contiguous()
    return torch.full((r,), float(s), device=device, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------------------
# Public functional op
# ------------------------------------------------------------------------------------------------------------

def multi_lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Sequence[Tensor | None] | None = None,
                      lora_b: Sequence[Tensor | None] | None = None, scale=None,
                      adapter_index: Tensor | Routing | None = None, *, bank: LoRABank | None = None,
                      fan_in_fan_out: bool = False, adapter_input: Tensor | None = None) -> Tensor:
    """y_m = x_m Wᵀ + b + ((h_m A_aᵀ) ⊙ s_a) B_aᵀ for x of shape (..., K), a = adapter_index of token m.

    weight: (N, K), or (K, N) with `fan_in_fan_out`; lora_a[i] (r_i, K), lora_b[i] (N, r_i) and scale[i] (a
    number or an (r_i,) tensor; or one number for all) per slot, None for an empty slot — or `bank`, a LoRABank of
    them built once. adapter_index: int tensor, one slot per token (shape x.shape[:-1]) or per row of a 3-D x
    (shape (B,)), -1 for none; or a Routing. adapter_input: h, the adapter branch's input (x after dropout), x's
    shape; default x.
    """
    if bank is None:
        if lora_a is None or lora_b is None or scale is None:
            raise InputError("multi_lora_linear: pass lora_a, lora_b and scale (one entry per slot), or bank=.")
        bank = LoRABank(lora_a, lora_b, scale)
    elif lora_a is not None or lora_b is not None or scale is not None:
        raise InputError("multi_lora_linear: pass either bank= or lora_a/lora_b/scale, not both.")
    x, weight, bias = autocast(x, weight, bias)
    K, N = _check(x, weight, bias, bank, adapter_input, fan_in_fan_out)
    routing = Routing.for_input(adapter_index, x, bank.num_slots, "multi_lora_linear")
    x2 = x.reshape(-1, K)
    h2 = None if adapter_input is None else adapter_input.reshape(-1, K)
    backend = _backend(x2)
    used = bank.slots_used(routing)
    if backend == "torch":  # autograd through the reference
        y = reference.multi_lora_linear(x2, weight, bias, bank.a, bank.b, bank.s, routing.segments(),
                                        bool(fan_in_fan_out), h2)
    else:
        tensors = [bank.a[s] for s in used] + [bank.b[s] for s in used]
        grads = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x2, weight, bias, h2, *tensors))
        if grads:
            y = _MultiLoRA.apply(x2, weight, bias, h2, bank, routing, bool(fan_in_fan_out), backend, used, *tensors)
        else:
            y = _forward(x2, weight, bias, h2, bank, routing, used, bool(fan_in_fan_out), backend, False)[0]
    return y.reshape(*x.shape[:-1], N)


def _check(x, weight, bias, bank: LoRABank, adapter_input, fan_in_fan_out) -> tuple[int, int]:
    """Host-side validation before any launch. Returns (K, N)."""
    where = "multi_lora_linear"
    K, N = check_linear(x, weight, bias, fan_in_fan_out, where)
    if bank.dtype is not None:
        if (bank.in_features, bank.out_features) != (K, N):
            raise InputError(f"{where}: the adapters map {bank.in_features} -> {bank.out_features} features, the "
                             f"base weight {K} -> {N}; pass adapters made for this layer: lora_a (r, {K}), lora_b "
                             f"({N}, r).")
        if bank.device != x.device:
            raise InputError(f"{where}: the adapters are on {bank.device} but x is on {x.device}; move them together.")
    if adapter_input is not None and (adapter_input.shape != x.shape or adapter_input.dtype != x.dtype
                                      or adapter_input.device != x.device):
        raise InputError(f"{where}: adapter_input is {adapter_input.dtype} {tuple(adapter_input.shape)} on "
                         f"{adapter_input.device}; it must be like x ({x.dtype} {tuple(x.shape)} on {x.device}).")
    return K, N


def _backend(x2: Tensor) -> str:
    return dispatch.choose("multi_lora_linear", x2.device, x2.dtype, triton_dtypes=TRITON_DTYPES,
                           has_cuda_kernel=True)


# ------------------------------------------------------------------------------------------------------------
# Forward and backward on the kernels
# ------------------------------------------------------------------------------------------------------------

def _forward(x2, weight, bias, h2, bank: LoRABank, routing: Routing, used, fan_in_fan_out, backend, need_t):
    """(y, T): y = base + low-rank term; T = h Aᵀ (M x R_max float32) when need_t, else None."""
    y = base_product(x2, weight, bias, fan_in_fan_out)
    h = x2 if h2 is None else h2
    M = x2.shape[0]
    if not used:  # no token of this batch has an adapter on this layer
        return y, None
    if backend == "cuda":
        if need_t:
            how, stop = dispatch.forcing("cuda")
            raise BackendError(f"multi_lora_linear: {how}, but the CUDA C++ kernel is a decode (forward) kernel; "
                               f"training runs the Triton kernels: force 'triton', or {stop}.")
        from . import cuda_ext

        cuda_ext.load().multi_lora_decode(y, h.contiguous(), bank.table, bank.ranks, routing.token_slot, bank.dtype)
        return y, None
    kern = _kernels()
    decode = M <= dispatch.kernel_options().decode_max_tokens and bank.max_rank <= MULTI_LORA_DECODE_MAX_RANK
    if decode and not need_t:
        kern.decode(h, bank.table, bank.ranks, routing.token_slot, y, max_rank=bank.max_rank,
                    adapter_dtype=bank.dtype, target_programs=target_programs(x2.device))
        return y, None
    t = dispatch.new_output((M, bank.max_rank), like=x2, dtype=torch.float32)
    seg = dict(num_segments=routing.num_segments, max_segment=routing.max_segment, max_rank=bank.max_rank,
               adapter_dtype=bank.dtype)
    kern.shrink(h, bank.table, bank.ranks, routing.order, routing.seg_start, routing.seg_slot, t, u_row=kern.ROW_A,
                rank_major=True, **seg)
    kern.expand(t, bank.table, bank.ranks, routing.order, routing.seg_start, routing.seg_slot, y, e_row=kern.ROW_B,
                rank_major=False, **seg)
    return y, (t if need_t else None)


class _MultiLoRA(torch.autograd.Function):
    """The kernels' forward and backward. Inputs after the non-tensor ones: A of every used slot, then B."""

    @staticmethod
    def forward(ctx, x2, weight, bias, h2, bank, routing, fan_in_fan_out, backend, used, *tensors):
        need_t = any(t.requires_grad for t in tensors[len(used):])
        y, t = _forward(x2, weight, bias, h2, bank, routing, used, fan_in_fan_out, backend, need_t)
        ctx.save_for_backward(x2, weight, h2, t)
        ctx.bank, ctx.routing, ctx.used, ctx.fan_in_fan_out = bank, routing, used, fan_in_fan_out
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.dispatch = dispatch.snapshot()  # the backward runs under the forward's dispatch state
        ctx.set_materialize_grads(False)
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, h2, t = ctx.saved_tensors
        n = len(ctx.used)
        need_x, need_w, need_b, need_h = ctx.needs_input_grad[:4]
        need_a, need_bb = ctx.needs_input_grad[9:9 + n], ctx.needs_input_grad[9 + n:]
        none = (None,) * (9 + 2 * n)
        if dy is None:
            return none
        with dispatch.restore(ctx.dispatch):
            grads = _backward(dy.contiguous(), x2, weight, h2, t, ctx.bank, ctx.routing, ctx.used,
                              ctx.fan_in_fan_out, need_x, need_w, need_h, need_a, need_bb)
        dx, dw, dh, da, db = grads
        dbias = dy.float().sum(0).to(ctx.bias_dtype) if need_b else None
        return (dx, dw, dbias, dh, None, None, None, None, None, *da, *db)


def _backward(dy, x2, weight, h2, t, bank: LoRABank, routing: Routing, used, fan_in_fan_out, need_x, need_w, need_h,
              need_a, need_b):
    """dX = dY W (+ (G ⊙ s) A on adapted tokens, G = dY B), dA = (G ⊙ s)ᵀ h, dB = dYᵀ (T ⊙ s) per used slot."""
    kern = _kernels()
    h = x2 if h2 is None else h2
    seg = dict(num_segments=routing.num_segments, max_segment=routing.max_segment, max_rank=bank.max_rank,
               adapter_dtype=bank.dtype)
    segs = (routing.order, routing.seg_start, routing.seg_slot)
    lora_dx = (need_x if h2 is None else need_h) and bool(used)
    g = None
    if lora_dx or any(need_a):
        g = dispatch.new_output((dy.shape[0], bank.max_rank), like=dy, dtype=torch.float32)
        kern.shrink(dy, bank.table, bank.ranks, *segs, g, u_row=kern.ROW_B, rank_major=False, **seg)
    dx = dw = dh = None
    if need_x:
        dx = dy @ (weight.t() if fan_in_fan_out else weight)
    if need_w:
        dw = dy.t().to(weight.dtype) @ x2.to(weight.dtype)
        dw = dw.t() if fan_in_fan_out else dw
    if lora_dx:
        target = dx if h2 is None else dy.new_zeros(h2.shape)
        kern.expand(g, bank.table, bank.ranks, *segs, target, e_row=kern.ROW_A, rank_major=True, **seg)
        dh = None if h2 is None else target
    def grads(tensors, needs):  # every element written by the reduction (poisoned under the tests)
        return [dispatch.new_output(tuple(tensors[s].shape), like=tensors[s]) if need else None
                for s, need in zip(used, needs)]

    da, db = grads(bank.a, need_a), grads(bank.b, need_b)
    for grads, source, s_in, rank_major in ((da, h, g, True), (db, dy, t, False)):
        if any(g_ is not None for g_ in grads):
            slots = [None] * bank.num_slots
            for s, g_ in zip(used, grads):
                slots[s] = g_
            kern.reduce(source, s_in, bank.table, bank.ranks, routing.order, routing.seg_start_host,
                        routing.seg_slot, pointer_table([slots], dy.device), max_rank=bank.max_rank,
                        rank_major=rank_major, out_dtype=bank.dtype)
    return dx, dw, dh, da, db
