"""`expert_lora`: the low-rank term of LoRA on fused mixture-of-experts weights, rows grouped by expert.

    t_m = s · (h_m A_eᵀ) B_eᵀ        e = the expert of row m;  A (r·E, in), B (out, r·E) in PEFT's layout

(math: fastpeft/reference/moe_lora.py). The caller sorts the (token, expert) pairs by expert, as transformers'
grouped experts forward does, and either takes t or has it added into the base projection of those rows (`out=`).
Validation is on the host, before any launch.

Backends. On CUDA (or a forced "triton", which under TRITON_INTERPRET=1 runs on CPU tensors) the multi-adapter
segment kernels of fastpeft/kernels/multi_lora.py with the expert as the slot: segment e = the rows of expert e,
slot e = (A_e, B_e, s), one launch per kernel for all experts, whatever E is:

    forward    T = h A_eᵀ (shrink, float32 (S, r)),  out[rows of e] += (T ⊙ s) B_eᵀ (expand, in place)
    backward   G = dY B_e (shrink),  dh = (G ⊙ s) A_e (expand),
               dA_e = (G ⊙ s)ᵀ h,  dB_e = dYᵀ (T ⊙ s) (reduce)

A_e = A[e·r:(e+1)·r] is contiguous: slot e points into A itself. B_e[:, j] = B[:, j·E + e] is strided (the kernels
read B_s dim-major with row stride r), so each call makes a contiguous copy B̃ (E, out, r) = B viewed (out, r, E)
permuted — O(E·r·out), small beside the rows' work — and dB̃ is permuted back into PEFT's layout. Experts without
rows are empty segments: the kernels skip their tiles and write zeros into their dA_e, dB_e. Elsewhere the
reference (one pair of small GEMMs per expert present; autograd through it).

A plain `torch.autograd.Function`, like fastpeft/ops/multi_lora.py and for the same reason: the slots are a
pointer table of raw addresses and the groups host integers (the module reads the group sizes on the host once per
layer call), so the experts forward runs eagerly.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import InputError
from ..kernels.limits import TRITON_DTYPES
from ..reference import moe_lora as reference
from . import dispatch, registry
from .routing import pointer_table

registry.describe("expert_lora", dtypes=TRITON_DTYPES,
                  doc="out[m] += s (h_m A_e^T) B_e^T, e = the expert of row m (rows grouped by expert)",
                  note="the multi-adapter segment kernels with slot = expert (shrink, expand; reduce backward)")


def _kernels():
    from ..kernels import multi_lora  # imported on first kernel call only: `import fastpeft` never loads triton

    return multi_lora


# ------------------------------------------------------------------------------------------------------------
# Public functional op
# ------------------------------------------------------------------------------------------------------------

def expert_lora(h: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float, group_sizes: Sequence[int], *,
                out: Tensor | None = None, rows: Tensor | None = None) -> Tensor:
    """The expert LoRA term of the rows of h (S, in) grouped by expert.

    Without `rows`, group e is the next group_sizes[e] rows of h. With `rows` (a 1-D integer tensor of row indices
    into h, listed expert by expert: its first group_sizes[0] entries are rows of expert 0, ...), only those rows
    are adapted. Returns t (S, out_features) when `out` is None (rows not adapted get 0; the adapters' dtype), else
    out (S, out_features) with t added to the adapted rows: in place on the kernel path (the same tensor is
    returned), a new tensor on the reference path — use the return value.
    """
    where = "expert_lora"
    num_experts = len(group_sizes)
    if lora_a.dim() != 2 or lora_b.dim() != 2 or num_experts == 0 or lora_a.shape[0] % num_experts \
            or lora_b.shape[1] != lora_a.shape[0] or lora_a.shape[0] == 0:
        raise InputError(f"{where}: lora_a {tuple(lora_a.shape)} and lora_b {tuple(lora_b.shape)} for "
                         f"{num_experts} experts; expected (r·E, in) and (out, r·E) (PEFT's target_parameters "
                         "layout).")
    if h.dim() != 2 or h.shape[1] != lora_a.shape[1]:
        raise InputError(f"{where}: h has shape {tuple(h.shape)}; expected (rows, {lora_a.shape[1]}).")
    sizes = [int(n) for n in group_sizes]
    adapted = h.shape[0] if rows is None else (rows.numel() if isinstance(rows, Tensor) else -1)
    if sum(sizes) != adapted or any(n < 0 for n in sizes):
        what = "h has" if rows is None else "rows lists"
        raise InputError(f"{where}: group_sizes sum to {sum(sizes)} but {what} {adapted} rows; give one "
                         "non-negative count per expert.")
    if rows is not None and (rows.dim() != 1 or rows.dtype.is_floating_point or rows.dtype == torch.bool
                             or rows.device != h.device):
        raise InputError(f"{where}: rows must be a 1-D integer tensor on {h.device} (row indices into h), got "
                         f"{rows.dtype} {tuple(rows.shape)} on {rows.device}.")
    if lora_a.device != h.device or lora_b.device != h.device:
        raise InputError(f"{where}: the adapters are on {lora_a.device}, h on {h.device}; move them together.")
    if lora_a.dtype != lora_b.dtype or not lora_a.dtype.is_floating_point:
        raise InputError(f"{where}: lora_a is {lora_a.dtype} and lora_b {lora_b.dtype}; both must be one floating "
                         "dtype: cast them, e.g. .float().")
    n_out = lora_b.shape[0]
    if out is not None and (out.dim() != 2 or tuple(out.shape) != (h.shape[0], n_out) or out.device != h.device):
        raise InputError(f"{where}: out has shape {tuple(out.shape)} on {out.device}; expected ({h.shape[0]}, "
                         f"{n_out}) on {h.device} (the base projection of h's rows).")
    if rows is not None and rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= h.shape[0]):
        raise InputError(f"{where}: rows holds indices outside [0, {h.shape[0]}); pass row indices into h.")
    backend = dispatch.choose(where, h.device, h.dtype, triton_dtypes=TRITON_DTYPES)
    if backend == "torch":
        return _reference(h, lora_a, lora_b, float(scale), sizes, out, rows)
    if lora_a.dtype not in TRITON_DTYPES or (out is not None and out.dtype not in TRITON_DTYPES):
        raise InputError(f"{where}: the kernels take adapters and outputs in "
                         f"{', '.join(str(d)[6:] for d in TRITON_DTYPES)}; got {lora_a.dtype}"
                         f"{'' if out is None else f' and {out.dtype}'}.")
    return _kernel_path(h, lora_a, lora_b, float(scale), sizes, out, rows)


def expert_delta_weight(lora_a: Tensor, lora_b: Tensor, scale: float, num_experts: int, transposed: bool) -> Tensor:
    """s·B_e A_e of every expert, (E, out, in) or (E, in, out) when `transposed`: the update merging folds in."""
    return reference.expert_delta_weight(lora_a, lora_b, float(scale), num_experts, transposed)


def _reference(h, lora_a, lora_b, scale, sizes, out, rows) -> Tensor:
    """The reference path (autograd through it): t, or out with t added to the adapted rows (out of place)."""
    if rows is None:
        t = reference.expert_lora(h, lora_a, lora_b, scale, sizes)
        return t if out is None else out + t.to(out.dtype)
    t = reference.expert_lora(h.index_select(0, rows.long()), lora_a, lora_b, scale, sizes)
    base = out if out is not None else h.new_zeros(h.shape[0], lora_b.shape[0], dtype=lora_a.dtype)
    return base.index_add(0, rows.long(), t.to(base.dtype))


# ------------------------------------------------------------------------------------------------------------
# The kernel path
# ------------------------------------------------------------------------------------------------------------

class ExpertGroups:
    """The rows of one call as the segment kernels take them: segment e = the rows of expert e (slot e).

    order (rows adapted,) int32: row indices, expert by expert; seg_start (E + 1,) int32 and seg_slot (E,) int32 on
    the device (one host-to-device copy); seg_start_host for the launchers' grids and the reduction's row chunks.
    """

    def __init__(self, order: Tensor, seg_start: Tensor, seg_slot: Tensor, seg_start_host: tuple[int, ...]):
        self.order, self.seg_start, self.seg_slot, self.seg_start_host = order, seg_start, seg_slot, seg_start_host

    @classmethod
    def build(cls, sizes: Sequence[int], device: torch.device, rows: Tensor | None = None) -> ExpertGroups:
        E = len(sizes)
        starts = [0]
        for n in sizes:
            starts.append(starts[-1] + n)
        packed = torch.tensor(starts + list(range(E)), dtype=torch.int32)
        packed = packed.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else packed.to(device)
        if rows is None:
            order = torch.arange(starts[-1], device=device, dtype=torch.int32)
        else:
            order = rows.to(torch.int32)
        return cls(order, packed[:E + 1], packed[E + 1:], tuple(starts))

    @property
    def num_experts(self) -> int:
        return len(self.seg_start_host) - 1

    @property
    def max_segment(self) -> int:
        s = self.seg_start_host
        return max(b - a for a, b in zip(s, s[1:]))


def _experts_b(lora_b: Tensor, num_experts: int) -> Tensor:
    """B̃ (E, out, r) contiguous, B̃[e] = B_e: B[:, j·E + e] gathered for every expert (one copy)."""
    n_out, re = lora_b.shape
    return lora_b.view(n_out, re // num_experts, num_experts).permute(2, 0, 1).contiguous()


def _slots(lora_a: Tensor, b_experts: Tensor, scale_vec: Tensor, num_experts: int, device) -> tuple[Tensor, Tensor]:
    """The pointer table (3, E) of the experts (A_e into A, B̃_e into B̃, one shared scale vector) and ranks (E,)."""
    r = lora_a.shape[0] // num_experts
    a_step = r * lora_a.shape[1] * lora_a.element_size()
    b_step = b_experts.shape[1] * r * b_experts.element_size()
    a0, b0, s0 = lora_a.data_ptr(), b_experts.data_ptr(), scale_vec.data_ptr()
    table = torch.tensor([[a0 + e * a_step for e in range(num_experts)],
                          [b0 + e * b_step for e in range(num_experts)],
                          [s0] * num_experts], dtype=torch.int64).to(device)
    ranks = torch.full((num_experts,), r, dtype=torch.int32, device=device)
    return table, ranks


def _segment_args(groups: ExpertGroups, rank: int, adapter_dtype) -> dict:
    return dict(num_segments=groups.num_experts, max_segment=groups.max_segment, max_rank=rank,
                adapter_dtype=adapter_dtype)


@torch.compiler.disable  # raw data pointers and host group sizes: runs eagerly (module docstring)
def _kernel_path(h, lora_a, lora_b, scale: float, sizes: list[int], out, rows) -> Tensor:
    if out is None:
        out = torch.zeros(h.shape[0], lora_b.shape[0], device=h.device, dtype=lora_a.dtype)
    groups = ExpertGroups.build(sizes, h.device, rows)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (h, lora_a, lora_b, out)):
        return _ExpertLoRA.apply(out, h, lora_a, lora_b, scale, groups)
    with torch.no_grad():
        return _forward(out, h, lora_a, _experts_b(lora_b, len(sizes)), scale, groups, need_t=False)[0]


def _forward(out, h, lora_a, b_experts, scale, groups: ExpertGroups, need_t: bool):
    """out[rows of e] += s (h A_eᵀ) B_eᵀ in place; returns (out, T = h A_eᵀ float32 (S, r) when need_t)."""
    E = groups.num_experts
    r = lora_a.shape[0] // E
    if groups.max_segment == 0:
        return out, (dispatch.new_output((h.shape[0], r), like=h, dtype=torch.float32) if need_t else None)
    kern = _kernels()
    lora_a = lora_a.contiguous()
    scale_vec = torch.full((r,), scale, device=h.device, dtype=torch.float32)
    table, ranks = _slots(lora_a, b_experts, scale_vec, E, h.device)
    t = dispatch.new_output((h.shape[0], r), like=h, dtype=torch.float32)
    seg = _segment_args(groups, r, lora_a.dtype)
    segs = (groups.order, groups.seg_start, groups.seg_slot)
    kern.shrink(h, table, ranks, *segs, t, u_row=kern.ROW_A, rank_major=True, **seg)
    kern.expand(t, table, ranks, *segs, out, e_row=kern.ROW_B, rank_major=False, **seg)
    return out, (t if need_t else None)


class _ExpertLoRA(torch.autograd.Function):
    """out += the expert term (in place, `out` marked dirty); gradients: out's passes through, h, A, B."""

    @staticmethod
    def forward(ctx, out, h, lora_a, lora_b, scale, groups):
        E = groups.num_experts
        b_experts = _experts_b(lora_b.detach(), E)
        out, t = _forward(out, h, lora_a.detach(), b_experts, scale, groups, need_t=lora_b.requires_grad)
        ctx.mark_dirty(out)
        ctx.save_for_backward(h, lora_a, b_experts, t)
        ctx.scale, ctx.groups, ctx.b_shape = scale, groups, tuple(lora_b.shape)
        ctx.dispatch = dispatch.snapshot()  # the backward runs under the forward's dispatch state
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx, dy):
        if dy is None:
            return (None,) * 6
        h, lora_a, b_experts, t = ctx.saved_tensors
        need_out, need_h, need_a, need_b = ctx.needs_input_grad[:4]
        with dispatch.restore(ctx.dispatch):
            dh, da, db = _backward(dy.contiguous(), h, lora_a.detach().contiguous(), b_experts, t, ctx.scale,
                                   ctx.groups, ctx.b_shape, need_h, need_a, need_b)
        return (dy if need_out else None), dh, da, db, None, None


def _backward(dy, h, lora_a, b_experts, t, scale, groups: ExpertGroups, b_shape, need_h, need_a, need_b):
    """dh = (G ⊙ s) A_e on adapted rows (0 elsewhere), G = dY B_e;  dA_e = (G ⊙ s)ᵀ h;  dB_e = dYᵀ (T ⊙ s)."""
    kern = _kernels()
    E = groups.num_experts
    r = lora_a.shape[0] // E
    scale_vec = torch.full((r,), scale, device=h.device, dtype=torch.float32)
    table, ranks = _slots(lora_a, b_experts, scale_vec, E, h.device)
    seg = _segment_args(groups, r, lora_a.dtype)
    segs = (groups.order, groups.seg_start, groups.seg_slot)
    busy = groups.max_segment > 0
    g = None
    if busy and (need_h or need_a):
        g = dispatch.new_output((dy.shape[0], r), like=dy, dtype=torch.float32)
        kern.shrink(dy, table, ranks, *segs, g, u_row=kern.ROW_B, rank_major=False, **seg)
    dh = da = db = None
    if need_h:
        dh = torch.zeros_like(h)  # the expand adds into it; rows not adapted keep their zero
        if busy:
            kern.expand(g, table, ranks, *segs, dh, e_row=kern.ROW_A, rank_major=True, **seg)
    if need_a:
        da = dispatch.new_output(tuple(lora_a.shape), like=lora_a)  # every element written (empty experts: zeros)
        if busy:
            kern.reduce(h, g, table, ranks, groups.order, groups.seg_start_host, groups.seg_slot,
                        pointer_table([[da[e * r:(e + 1) * r] for e in range(E)]], dy.device), max_rank=r,
                        rank_major=True, out_dtype=lora_a.dtype)
        else:
            da.zero_()
    if need_b:
        db_experts = dispatch.new_output(tuple(b_experts.shape), like=b_experts)
        if busy:
            kern.reduce(dy, t, table, ranks, groups.order, groups.seg_start_host, groups.seg_slot,
                        pointer_table([[db_experts[e] for e in range(E)]], dy.device), max_rank=r,
                        rank_major=False, out_dtype=b_experts.dtype)
        else:
            db_experts.zero_()
        db = db_experts.permute(1, 2, 0).reshape(b_shape)  # B[n, j·E + e] = B̃[e, n, j]
    return dh, da, db
