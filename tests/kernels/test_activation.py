"""The Triton non-linearities (fastpeft/kernels/_activation.py) under the interpreter: each code of
fastpeft/kernels/limits.py ACTIVATIONS computes the reference activation of its name, and its slope the derivative.

A small test kernel applies `activation` and `activation_slope` to a float32 tile, as the fused bottleneck kernels
and the LoRA GEMM's epilogue call them; values and slopes are compared with fastpeft.reference.bottleneck's
PyTorch function of the same name and its autograd gradient, in float64.
"""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from fastpeft.kernels._activation import activation, activation_slope  # noqa: E402
from fastpeft.kernels.limits import ACTIVATIONS  # noqa: E402
from fastpeft.reference.bottleneck import activation as reference_activation  # noqa: E402

BLOCK = 64


@triton.jit
def _activation_kernel(z_ptr, f_ptr, g_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    z = tl.load(z_ptr + offs, mask=ok, other=0.0)[None, :]  # a (1, BLOCK) tile, as the kernels' tiles are 2-D
    f = activation(z, ACT)
    g = activation_slope(z, f, ACT)
    tl.store(f_ptr + offs[None, :], f, mask=ok[None, :])
    tl.store(g_ptr + offs[None, :], g, mask=ok[None, :])


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_each_code_computes_its_reference_activation(name, kernel_device):
    z = torch.cat([torch.linspace(-6.0, 6.0, 97), torch.tensor([0.0, 1e-3, -1e-3])]).to(torch.float32)
    f = torch.full_like(z, float("nan"), device=kernel_device)
    g = torch.full_like(z, float("nan"), device=kernel_device)
    _activation_kernel[(triton.cdiv(z.numel(), BLOCK),)](z.to(kernel_device), f, g, z.numel(),
                                                         ACT=ACTIVATIONS[name], BLOCK=BLOCK)
    z64 = z.double().requires_grad_(True)
    want = reference_activation(name)(z64)
    (slope,) = torch.autograd.grad(want.sum(), z64)
    assert torch.isfinite(f).all() and torch.isfinite(g).all(), "elements left unwritten"
    assert (f.cpu().double() - want.detach()).abs().max().item() < 1e-5, name
    assert (g.cpu().double() - slope).abs().max().item() < 1e-5, name
