"""Reusable checks for every op: its Triton path against the reference, forward and backward, vs float64.

`check_op(fn, make_inputs, dtype)` runs `fn(**inputs)` three ways: the reference in float64 (the oracle), the
reference in `dtype` (PyTorch's own error at that precision), and the Triton path in `dtype` with every op
output poisoned with NaN. It asserts that the output and every input gradient of the Triton path are finite
and within tolerance of the oracle: the DESIGN.md rule, relative Frobenius error under TOLERANCE[dtype] or no
more than twice the reference's own same-dtype error. Adding an op's interpreter test is one call.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable

import pytest
import torch

from fastpeft.ops import poison_outputs, use_backend

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the kernels run (CPU: the interpreter)

TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; inf when out has NaN/inf (NaN never passes)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def assert_close(out, ref64, dtype, *, same_dtype_ref=None, what="output", tol=None):
    tol = TOLERANCE[dtype] if tol is None else tol
    err = rel_err(out, ref64)
    bound = tol if same_dtype_ref is None else max(tol, 2.0 * rel_err(same_dtype_ref, ref64))
    assert err <= bound, f"{what}: relative error {err:.3e} > {bound:.3e} ({dtype})"
    return err


def _to64(v):
    if isinstance(v, torch.Tensor) and v.dtype.is_floating_point:
        return v.detach().double().requires_grad_(v.requires_grad)
    return v


def _run(fn, inputs, backend, grad_out=None):
    """Forward and backward of fn(**inputs) on `backend`; grad_out is drawn (float64) when not given."""
    with use_backend(backend), poison_outputs(backend != "torch"):
        out = fn(**inputs)
        if grad_out is None:
            grad_out = torch.randn(out.shape, dtype=torch.float64, device=out.device)
        leaves = [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad]
        grads = {}
        if leaves:
            values = torch.autograd.grad(out, [inputs[k] for k in leaves], grad_out.to(out.dtype))
            grads = dict(zip(leaves, values))
    return out, grads, grad_out


def check_op(fn: Callable, make_inputs: Callable[[torch.dtype], dict], dtype: torch.dtype, *,
             backend: str = "triton", tol: float | None = None) -> dict[str, float]:
    """Compare `backend` against the float64 reference; returns the relative errors it measured."""
    inputs = make_inputs(dtype)
    inputs64 = {k: _to64(v) for k, v in inputs.items()}
    out64, grads64, grad_out = _run(fn, inputs64, "torch")
    out_ref, grads_ref, _ = _run(fn, {k: _fresh(v) for k, v in inputs.items()}, "torch", grad_out)
    out_k, grads_k, _ = _run(fn, {k: _fresh(v) for k, v in inputs.items()}, backend, grad_out)
    assert out_k.dtype == out_ref.dtype and out_k.shape == out64.shape
    errors = {"output": assert_close(out_k, out64, dtype, same_dtype_ref=out_ref, tol=tol)}
    for name, g64 in grads64.items():
        errors[f"d{name}"] = assert_close(grads_k[name], g64, dtype, same_dtype_ref=grads_ref[name],
                                          what=f"gradient of {name}", tol=tol)
    return errors


def _fresh(v):
    """The same values as a new leaf (so each run gets its own autograd graph)."""
    if isinstance(v, torch.Tensor):
        return v.detach().clone().requires_grad_(v.requires_grad)
    return v


def sgd_losses(model, ids: torch.Tensor, *, steps: int = 3, lr: float = 0.1) -> list[float]:
    """The losses of `steps` SGD steps on the model's trainable parameters (labels = ids)."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
