"""LoRA on fused expert tensors in plain PyTorch: the CPU kernel and the oracle of the expert LoRA op.

    t_m = s · (h_m A_eᵀ) B_eᵀ        e = the expert of row m (rows grouped by expert, in expert order)

A (r·E, in) and B (out, r·E) are PEFT's layout for target_parameters (peft/tuners/lora/layer.py ParamWrapper):
A_e = A[e·r : (e+1)·r] and B_e = B[:, e::E] (rank-major, expert-minor columns). The update PEFT folds into
expert e's weight is s·B_e A_e; applied to the rows of e it is the term above, computed without forming B_e A_e
(out x in), so nothing of size E·in·out is allocated. Autograd through it gives dA and dB.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def expert_lora(h: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                group_sizes: Sequence[int]) -> torch.Tensor:
    """The term t (S, out) for h (S, in) whose rows are grouped by expert: group e is the next group_sizes[e]
    rows. Computed in the adapters' dtype, one expert group at a time (experts without rows are skipped)."""
    num_experts = len(group_sizes)
    r = lora_a.shape[0] // num_experts
    b3 = lora_b.view(lora_b.shape[0], r, num_experts)
    h = h.to(lora_a.dtype)
    pieces, start = [], 0
    for e, n in enumerate(group_sizes):
        if n == 0:
            continue
        t = h[start:start + n] @ lora_a[e * r:(e + 1) * r].t()
        pieces.append((t * scale) @ b3[:, :, e].t())
        start += n
    if not pieces:
        return h.new_zeros(h.shape[0], lora_b.shape[0])
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def expert_delta_weight(lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, num_experts: int,
                        transposed: bool) -> torch.Tensor:
    """s·B_e A_e for every expert (E, out, in), or (E, in, out) for a transposed layout: PEFT's merge update."""
    r = lora_a.shape[0] // num_experts
    a3 = lora_a.reshape(num_experts, r, lora_a.shape[1])
    b3 = lora_b.reshape(lora_b.shape[0], r, num_experts)
    pattern = "o r e, e r i -> e i o" if transposed else "o r e, e r i -> e o i"
    return torch.einsum(pattern, b3, a3) * scale
