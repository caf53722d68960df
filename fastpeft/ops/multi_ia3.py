"""`fp.ops.multi_ia3_linear`: an IA3 linear whose tokens use different adapters, with autograd.

    output scaling:  y_m = (x_m Wᵀ + b) ⊙ l_a        input scaling (feedforward=True):  y_m = (x_m ⊙ l_a) Wᵀ + b

a = the adapter of token m (none: y_m = x_m Wᵀ + b); math: fastpeft/reference/multi_ia3.py. The vectors are given by
slot (a list, None for an empty slot, or an `IA3Bank` built once) and read in place through a pointer table.

Backends: on CUDA, more than TINY_M tokens run one GEMM (fastpeft/kernels/multi_ia3.py) with each row's vector
gathered in its prologue or epilogue; up to TINY_M tokens run cuBLAS and a row-scale kernel (a GEMM tile would leave
the GPU idle). Training: cuBLAS for the products and the row-scale kernel for the per-row vectors, the vector
gradients summed per segment: dv_a = Σ_{m of a} dY_m ⊙ Z_m (Z = x Wᵀ + b), du_a = Σ_{m of a} (dY W)_m ⊙ x_m.
Elsewhere the reference, differentiable by autograd.

Why plain `torch.autograd.Function`s, not registered `torch.library` ops like the single-adapter ops: their inputs
are an IA3Bank (a pointer table of raw data addresses) and a Routing (host-side per-batch segment lists). As
registered ops those would become host integer lists in the schema, so torch.compile would recompile for every
batch composition, and fake tensors have no addresses to build a pointer table from. Multi-adapter batches run
eagerly by design (the modules call these ops outside torch.compile's graph).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import InputError
from ..kernels.limits import TRITON_DTYPES
from ..reference import multi_ia3 as reference
from . import dispatch, registry
from ._common import TINY_M, autocast, base_product, check_linear
from .routing import Routing, pointer_table

registry.describe("multi_ia3_linear", dtypes=TRITON_DTYPES, doc="y_m = ((x_m * u_a) W^T + b) * v_a",
                  note=f"> {TINY_M} tokens: one GEMM with the rows' vectors gathered in prologue/epilogue; fewer: "
                       "cuBLAS + a row-scale kernel")


def _kernels():
    from ..kernels import multi_ia3  # imported on first CUDA call only

    return multi_ia3


class IA3Bank:
    """The IA3 vectors of one layer by slot (None: empty), read in place through `table` (1, S) int64."""

    def __init__(self, vectors: Sequence[Tensor | None], *, where: str = "multi_ia3_linear"):
        self.vectors: list[Tensor | None] = []
        self.size = self.dtype = self.device = None
        for i, v in enumerate(vectors):
            if v is None:
                self.vectors.append(None)
                continue
            if v.dim() != 1 or not v.dtype.is_floating_point:
                raise InputError(f"{where}: slot {i} holds a {v.dtype} tensor of shape {tuple(v.shape)}; an IA3 "
                                 "vector is 1-D floating point (one entry per scaled feature): pass such vectors.")
            if self.dtype is None:
                self.size, self.dtype, self.device = v.shape[0], v.dtype, v.device
            if (v.shape[0], v.dtype, v.device) != (self.size, self.dtype, self.device):
                raise InputError(f"{where}: slot {i} is a {v.dtype} ({v.shape[0]},) vector on {v.device}, the first "
                                 f"a {self.dtype} ({self.size},) one on {self.device}; keep one size, dtype and device "
                                 "(cast or move them).")
            self.vectors.append(v.contiguous())
        self.table = pointer_table([self.vectors], self.device or torch.device("cpu"))

    @property
    def num_slots(self) -> int:
        return len(self.vectors)

    def slots_used(self, routing: Routing) -> list[int]:
        return [s for s in routing.seg_slot_host if s < len(self.vectors) and self.vectors[s] is not None]


def multi_ia3_linear(x: Tensor, weight: Tensor, bias: Tensor | None, vectors: Sequence[Tensor | None] | None = None,
                     adapter_index: Tensor | Routing | None = None, *, bank: IA3Bank | None = None,
                     feedforward: bool = False, fan_in_fan_out: bool = False) -> Tensor:
    """y_m = (x_m Wᵀ + b) ⊙ l_a, or (x_m ⊙ l_a) Wᵀ + b with `feedforward`, for x of shape (..., K).

    vectors[i]: (N,) (output scaling) or (K,) (feedforward) per slot, None for an empty slot — or `bank`, an
    IA3Bank of them. adapter_index: int tensor, one slot per token (x.shape[:-1]) or per row of a 3-D x ((B,)),
    -1 for none; or a Routing.
    """
    if (bank is None) == (vectors is None):
        raise InputError("multi_ia3_linear: pass the vectors (one entry per slot) or bank=, exactly one of them.")
    bank = bank if bank is not None else IA3Bank(vectors)
    x, weight, bias = autocast(x, weight, bias)
    K, N = _check(x, weight, bias, bank, feedforward, fan_in_fan_out)
    routing = Routing.for_input(adapter_index, x, bank.num_slots, "multi_ia3_linear")
    x2 = x.reshape(-1, K)
    backend = dispatch.choose("multi_ia3_linear", x2.device, x2.dtype, triton_dtypes=TRITON_DTYPES)
    used = bank.slots_used(routing)
    if backend == "torch":
        y = reference.multi_ia3_linear(x2, weight, bias, bank.vectors, routing.segments(), bool(feedforward),
                                       bool(fan_in_fan_out))
    elif not used:
        y = base_product(x2, weight, bias, fan_in_fan_out)
    else:
        tensors = [bank.vectors[s] for s in used]
        grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x2, weight, bias, *tensors))
        if grads:
            y = _MultiIA3.apply(x2, weight, bias, bank, routing, bool(feedforward), bool(fan_in_fan_out), used,
                                *tensors)
        else:
            y = _forward(x2, weight, bias, bank, routing, feedforward, fan_in_fan_out)
    return y.reshape(*x.shape[:-1], N)


def _check(x, weight, bias, bank: IA3Bank, feedforward, fan_in_fan_out) -> tuple[int, int]:
    where = "multi_ia3_linear"
    K, N = check_linear(x, weight, bias, fan_in_fan_out, where)
    size = K if feedforward else N
    flip = f", or feedforward={not feedforward} for vectors that scale the {'output' if feedforward else 'input'}" \
        if bank.size == (N if feedforward else K) else ""
    if bank.size is not None and bank.size != size:
        raise InputError(f"{where}: the vectors have {bank.size} entries; {'input' if feedforward else 'output'} "
                         f"scaling of this layer needs {size}; pass ({size},) vectors{flip}.")
    if bank.device is not None and bank.device != x.device:
        raise InputError(f"{where}: the vectors are on {bank.device} but x is on {x.device}; move them together.")
    return K, N


def _forward(x2, weight, bias, bank: IA3Bank, routing: Routing, feedforward, fan_in_fan_out):
    kern = _kernels()
    if x2.shape[0] > TINY_M:
        out = dispatch.new_output((x2.shape[0], weight.shape[1] if fan_in_fan_out else weight.shape[0]), like=x2)
        w_kn = weight if fan_in_fan_out else weight.t()
        return kern.gemm(x2, w_kn, bias, out, bank.table, routing.token_slot, in_scale=feedforward,
                         vector_dtype=bank.dtype)
    if feedforward:
        h = _scaled_rows(x2, bank, routing)
        return base_product(h, weight, bias, fan_in_fan_out)
    y = base_product(x2, weight, bias, fan_in_fan_out)
    return kern.row_scale(y, y, bank.table, routing.token_slot, vector_dtype=bank.dtype)


class _MultiIA3(torch.autograd.Function):
    """Training: cuBLAS products, per-row vectors by the row-scale kernel, vector gradients per segment."""

    @staticmethod
    def forward(ctx, x2, weight, bias, bank, routing, feedforward, fan_in_fan_out, used, *vectors):
        if feedforward:
            h = _scaled_rows(x2, bank, routing)
            y = base_product(h, weight, bias, fan_in_fan_out)
            ctx.save_for_backward(x2, weight, h)
        else:
            z = base_product(x2, weight, bias, fan_in_fan_out)
            y = _scaled_rows(z, bank, routing)
            ctx.save_for_backward(x2, weight, z)
        ctx.bank, ctx.routing, ctx.used = bank, routing, used
        ctx.feedforward, ctx.fan_in_fan_out = feedforward, fan_in_fan_out
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.dispatch = dispatch.snapshot()  # the backward runs under the forward's dispatch state
        ctx.set_materialize_grads(False)
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, kept = ctx.saved_tensors  # kept: x ⊙ u (feed-forward) or Z = x Wᵀ + b
        n = len(ctx.used)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_v = ctx.needs_input_grad[8:8 + n]
        if dy is None:
            return (None,) * (8 + n)
        bank, routing = ctx.bank, ctx.routing
        dy = dy.contiguous()
        w_nk = weight.t() if ctx.fan_in_fan_out else weight
        dx = dw = dbias = None
        with dispatch.restore(ctx.dispatch):
            if ctx.feedforward:  # y = h Wᵀ + b, h = x ⊙ u
                dh = dy @ w_nk if (need_x or any(need_v)) else None
                if need_x:
                    dx = _scaled_rows(dh, bank, routing)
                grad_of, left, right, wrt_w = dy, dh, x2, kept
            else:  # y = z ⊙ v
                dz = _scaled_rows(dy, bank, routing)
                if need_x:
                    dx = dz @ w_nk
                grad_of, left, right, wrt_w = dz, dy, kept, x2
        if need_w:
            dw = grad_of.t().to(weight.dtype) @ wrt_w.to(weight.dtype)
            dw = dw.t() if ctx.fan_in_fan_out else dw
        if need_b:
            dbias = grad_of.float().sum(0).to(ctx.bias_dtype)
        dvs = [_segment_dot(left, right, routing, s, bank.vectors[s].dtype) if need else None
               for s, need in zip(ctx.used, need_v)]
        return (dx, dw, dbias, None, None, None, None, None, *dvs)


def _scaled_rows(t: Tensor, bank: IA3Bank, routing: Routing) -> Tensor:
    """A new tensor t_m ⊙ l_a (the row-scale kernel; written everywhere, poisoned under the tests)."""
    return _kernels().row_scale(t, dispatch.new_output(tuple(t.shape), like=t), bank.table, routing.token_slot,
                                vector_dtype=bank.dtype)


def _segment_dot(p: Tensor, q: Tensor, routing: Routing, slot: int, dtype) -> Tensor:
    """Σ over the tokens of `slot`'s segment of p ⊙ q, in float32."""
    i = routing.seg_slot_host.index(slot)
    rows = routing.order[routing.seg_start_host[i]:routing.seg_start_host[i + 1]]
    return (p.index_select(0, rows).float() * q.index_select(0, rows).float()).sum(0).to(dtype)


def multi_ia3_scale(t: Tensor, vectors: Sequence[Tensor | None] | None = None,
                    adapter_index: Tensor | Routing | None = None, *, bank: IA3Bank | None = None) -> Tensor:
    """t_m ⊙ l_a for t of shape (..., D), a = the adapter of token m (none: t_m): the per-row IA3 scale alone, for a
    layer whose product another module computes (IA3 around a LoRA layer). Differentiable in t and the vectors."""
    if (bank is None) == (vectors is None):
        raise InputError("multi_ia3_scale: pass the vectors (one entry per slot) or bank=, exactly one of them.")
    bank = bank if bank is not None else IA3Bank(vectors, where="multi_ia3_scale")
    D = t.shape[-1]
    if bank.size is not None and (bank.size != D or bank.device != t.device):
        raise InputError(f"multi_ia3_scale: the vectors are ({bank.size},) on {bank.device}; t has {D} features on "
                         f"{t.device}; pass ({D},) vectors on t's device.")
    routing = Routing.for_input(adapter_index, t, bank.num_slots, "multi_ia3_scale")
    t2 = t.reshape(-1, D)
    used = bank.slots_used(routing)
    backend = dispatch.choose("multi_ia3_linear", t2.device, t2.dtype, triton_dtypes=TRITON_DTYPES)
    if not used:
        return t
    if backend == "torch":
        y = reference.multi_ia3_scale(t2, bank.vectors, routing.segments())
    else:
        y = _MultiIA3Scale.apply(t2, bank, routing, used, *[bank.vectors[s] for s in used])
    return y.reshape(t.shape)


class _MultiIA3Scale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t2, bank, routing, used, *vectors):
        ctx.save_for_backward(t2)
        ctx.bank, ctx.routing, ctx.used = bank, routing, used
        ctx.dispatch = dispatch.snapshot()  # the backward runs under the forward's dispatch state
        ctx.set_materialize_grads(False)
        return _scaled_rows(t2, bank, routing)

    @staticmethod
    def backward(ctx, dy):
        (t2,) = ctx.saved_tensors
        n = len(ctx.used)
        if dy is None:
            return (None,) * (4 + n)
        dy = dy.contiguous()
        dt = None
        if ctx.needs_input_grad[0]:
            with dispatch.restore(ctx.dispatch):
                dt = _scaled_rows(dy, ctx.bank, ctx.routing)
        dvs = [_segment_dot(dy, t2, ctx.routing, s, ctx.bank.dtype) if need else None
               for s, need in zip(ctx.used, ctx.needs_input_grad[4:])]
        return (dt, None, None, None, *dvs)
