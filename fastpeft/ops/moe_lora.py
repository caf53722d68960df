"""`expert_lora`: the low-rank term of LoRA on fused mixture-of-experts weights, rows grouped by expert.

    t_m = s · (h_m A_eᵀ) B_eᵀ        e = the expert of row m;  A (r·E, in), B (out, r·E) in PEFT's layout

(math: fastpeft/reference/moe_lora.py). The caller sorts the (token, expert) pairs by expert, as transformers'
grouped experts forward does, and adds t to the base projection of those rows. Validation is on the host.
Backend: the reference on every device (one pair of small GEMMs per expert present; autograd through it). The
Triton grouped path (the multi-adapter segment kernels of fastpeft/kernels/multi_lora.py, with the expert as the
slot) is not wired in yet; FASTPEFT_BACKEND=triton|cuda is refused here rather than ignored.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ..errors import BackendError, InputError
from ..reference import moe_lora as reference
from . import dispatch


def expert_lora(h: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float, group_sizes: Sequence[int]) -> Tensor:
    """t (S, out) for h (S, in) grouped by expert (group e: the next group_sizes[e] rows)."""
    where = "expert_lora"
    num_experts = len(group_sizes)
    if lora_a.dim() != 2 or lora_b.dim() != 2 or num_experts == 0 or lora_a.shape[0] % num_experts \
            or lora_b.shape[1] != lora_a.shape[0]:
        raise InputError(f"{where}: lora_a {tuple(lora_a.shape)} and lora_b {tuple(lora_b.shape)} for "
                         f"{num_experts} experts; expected (r·E, in) and (out, r·E) (PEFT's target_parameters layout).")
    if h.dim() != 2 or h.shape[1] != lora_a.shape[1]:
        raise InputError(f"{where}: h has shape {tuple(h.shape)}; expected (rows, {lora_a.shape[1]}).")
    if sum(group_sizes) != h.shape[0] or any(n < 0 for n in group_sizes):
        raise InputError(f"{where}: group_sizes sum to {sum(group_sizes)} but h has {h.shape[0]} rows; give one "
                         "non-negative count per expert.")
    if lora_a.device != h.device or lora_b.device != h.device:
        raise InputError(f"{where}: the adapters are on {lora_a.device}, h on {h.device}; move them together.")
    forced = dispatch.requested_backend()
    if forced in ("triton", "cuda"):
        how, stop = dispatch.forcing(forced)
        raise BackendError(f"{where}: {how}, but expert LoRA has no {forced} kernel yet; {stop} to use the "
                           "PyTorch reference.")
    return reference.expert_lora(h, lora_a, lora_b, float(scale), group_sizes)


def expert_delta_weight(lora_a: Tensor, lora_b: Tensor, scale: float, num_experts: int, transposed: bool) -> Tensor:
    """s·B_e A_e of every expert, (E, out, in) or (E, in, out) when `transposed`: the update merging folds in."""
    return reference.expert_delta_weight(lora_a, lora_b, float(scale), num_experts, transposed)
