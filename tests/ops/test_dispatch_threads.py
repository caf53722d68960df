"""The dispatch state (fastpeft/ops/dispatch.py) is per thread, and an op's backward runs under its forward's.

`use_backend`, `poison_outputs` and `use_kernel_options` are context variables: a thread started with
threading.Thread sees none of its starter's, as the autograd engine's worker threads (which run the backward of
CUDA tensors) see none of the caller's. So every op saves `dispatch.snapshot()` in its forward and runs its backward
under `dispatch.restore(...)`: here the backward runs on a new thread, whose own state is the default, and must
still run the forced kernels, with outputs poisoned, under the forward's kernel options.
"""
from __future__ import annotations

import importlib
import threading

import pytest
import torch

import fastpeft as fp
from fastpeft.ops import dispatch
from tests.harness import DEVICE, needs_triton, rel_err

DEFAULT = dispatch.Snapshot(None, False, dispatch.KernelOptions())


def _rand(*shape, grad=False, std=1.0):
    return (torch.randn(*shape, device=DEVICE) * std).requires_grad_(grad)


def _lora():
    x, w = _rand(20, 24, grad=True), _rand(28, 24, std=0.2)
    a, b = _rand(4, 24, grad=True, std=0.2), _rand(28, 4, grad=True, std=0.2)
    return (lambda: fp.ops.lora_linear(x, w, None, a, b, 0.5)), [x, a, b]


def _ia3():
    x, w = _rand(20, 24, grad=True), _rand(28, 24, std=0.2)
    u, v = (1 + 0.1 * _rand(24)).requires_grad_(True), (1 + 0.1 * _rand(28)).requires_grad_(True)
    return (lambda: fp.ops.ia3_linear(x, w, None, u, v)), [x, u, v]


def _bottleneck():
    x, r = _rand(20, 16, grad=True), _rand(20, 16)
    wd, bd = _rand(4, 16, grad=True, std=0.3), _rand(4, grad=True)
    wu, bu = _rand(16, 4, grad=True, std=0.3), _rand(16, grad=True)
    return (lambda: fp.ops.bottleneck_adapter(x, r, wd, bd, wu, bu, non_linearity="gelu")), [x, wd, bd, wu, bu]


def _attention():
    q, k, v = _rand(1, 2, 5, 64, grad=True), _rand(1, 2, 7, 64, grad=True), _rand(1, 2, 7, 64, grad=True)
    pk, pv = _rand(1, 2, 3, 64, grad=True), _rand(1, 2, 3, 64, grad=True)
    return (lambda: fp.ops.prefix_attention(q, k, v, pk, pv, causal=True)), [q, k, v, pk, pv]


def _multi_lora():
    x, w = _rand(20, 24, grad=True), _rand(28, 24, std=0.2)
    a = [_rand(r, 24, grad=True, std=0.2) for r in (2, 5)]
    b = [_rand(28, r, grad=True, std=0.2) for r in (2, 5)]
    index = torch.tensor([0, 1, -1, 1, 0] * 4, dtype=torch.int32, device=DEVICE)
    return (lambda: fp.ops.multi_lora_linear(x, w, None, a, b, [0.5, 2.0], index)), [x, *a, *b]


def _multi_ia3():
    x, w = _rand(20, 24, grad=True), _rand(28, 24, std=0.2)
    vectors = [(1 + 0.1 * _rand(28)).requires_grad_(True) for _ in range(2)]
    index = torch.tensor([0, 1, -1, 1, 0] * 4, dtype=torch.int32, device=DEVICE)
    return (lambda: fp.ops.multi_ia3_linear(x, w, None, vectors, index)), [x, *vectors]


OPS = {"lora_linear": _lora, "ia3_linear": _ia3, "bottleneck_adapter": _bottleneck,
       "prefix_attention": _attention, "multi_lora_linear": _multi_lora, "multi_ia3_linear": _multi_ia3}


@pytest.fixture
def allocations(monkeypatch):
    """(thread id, dispatch state) of each output the ops allocate (every kernel path allocates through
    dispatch.new_output)."""
    seen: list[tuple[int, dispatch.Snapshot]] = []
    real = dispatch.new_output

    def spy(*args, **kwargs):
        seen.append((threading.get_ident(), dispatch.snapshot()))
        return real(*args, **kwargs)

    monkeypatch.setattr(dispatch, "new_output", spy)
    return seen


def _on_new_thread(fn):
    """fn() on a fresh threading.Thread; (its result, the thread's own dispatch state before fn ran, thread id)."""
    out = {}

    def run():
        out["state"] = dispatch.snapshot()
        try:
            out["result"] = fn()
        except BaseException as exc:  # re-raised on the caller's thread
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out.get("result"), out["state"], thread.ident


@needs_triton
@pytest.mark.parametrize("op", list(OPS))
def test_backward_on_another_thread_runs_under_the_forward_state(op, allocations):
    """Forward under use_backend("triton") + poison_outputs() + kernel options; backward on a new thread (its own
    state: the defaults) still runs the kernels, poisoned, under those options; gradients match the reference."""
    torch.manual_seed(0)
    fn, leaves = OPS[op]()
    options = dict(fused_shrink=False, decode_max_tokens=3, decode_splits=2, linear_strategy="fused")
    with fp.ops.use_backend("triton"), fp.ops.poison_outputs(), fp.ops.use_kernel_options(**options):
        y = fn()
        forward = dispatch.snapshot()
    assert forward == dispatch.Snapshot("triton", True, dispatch.KernelOptions(**options))
    dy = torch.randn_like(y)
    allocations.clear()
    grads, thread_state, thread_id = _on_new_thread(lambda: torch.autograd.grad(y, leaves, dy))
    assert thread_state == DEFAULT, "a new thread inherited the caller's dispatch state: the test proves nothing"
    backward = [state for ident, state in allocations if ident == thread_id]
    assert backward, f"{op}: the backward allocated nothing on its thread: it ran the reference, not the kernels"
    assert all(state == forward for state in backward), backward
    with fp.ops.use_backend("torch"):
        want = torch.autograd.grad(fn(), leaves, dy)
    for got, expect in zip(grads, want):
        assert rel_err(got, expect) < 1e-4


@needs_triton
def test_backward_on_another_thread_runs_the_forced_reference(monkeypatch):
    """The other way round: a forward forced to "torch" by its caller keeps the reference in a backward run on a
    thread whose own choice (here forced "triton") would launch the kernels."""
    kern = importlib.import_module("fastpeft.kernels.lora")
    launched = []
    for name in ("gemm", "shrink", "reduce"):
        monkeypatch.setattr(kern, name, lambda *a, _n=name, **k: launched.append(_n))
    x, w = _rand(20, 24, grad=True), _rand(28, 24, std=0.2)
    a, b = _rand(4, 24, grad=True, std=0.2), _rand(28, 4, grad=True, std=0.2)
    leaves = [x, a, b]
    with fp.ops.use_backend("torch"):  # the registered op itself (lora_linear would take its eager reference path)
        y = torch.ops.fastpeft.lora_linear(x, w, None, a, b, torch.full((4,), 0.5, device=DEVICE), None, 0.0, False,
                                           True, None, False)[0]

    def backward():
        with fp.ops.use_backend("triton"):
            return torch.autograd.grad(y.sum(), leaves)

    grads, _, _ = _on_new_thread(backward)
    assert launched == [] and all(torch.isfinite(g).all() for g in grads)


def test_threads_do_not_see_each_others_dispatch_state():
    """Two threads inside different use_backend / use_kernel_options / poison_outputs blocks at the same time,
    interleaved by a barrier: each reads its own state, before and after the other changes its own."""
    barrier = threading.Barrier(2, timeout=60)
    seen: dict[str, list] = {"a": [], "b": []}
    blocks = {"a": ("torch", dict(fused_shrink=True, decode_max_tokens=1), False),
              "b": ("triton", dict(fused_shrink=False, decode_splits=7), True)}
    errors = []

    def worker(name):
        backend, options, poison = blocks[name]
        try:
            barrier.wait()  # both threads start with the defaults
            seen[name].append(dispatch.snapshot())
            with fp.ops.use_backend(backend), fp.ops.use_kernel_options(**options), fp.ops.poison_outputs(poison):
                barrier.wait()  # both blocks entered
                seen[name].append((fp.ops.requested_backend(), fp.ops.kernel_options(), dispatch.snapshot()))
                if name == "a":
                    with fp.ops.use_backend("cuda"):  # a nested change in one thread only
                        barrier.wait()
                        seen[name].append(fp.ops.requested_backend())
                        barrier.wait()
                else:
                    barrier.wait()
                    seen[name].append(fp.ops.requested_backend())  # while "a" is inside its nested block
                    barrier.wait()
                seen[name].append(dispatch.snapshot())
            barrier.wait()  # both blocks left
            seen[name].append(dispatch.snapshot())
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(name,)) for name in blocks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for name, (backend, options, poison) in blocks.items():
        mine = dispatch.Snapshot(backend, poison, dispatch.KernelOptions(**options))
        start, inside, nested, end_inside, after = seen[name]
        assert start == DEFAULT and after == DEFAULT
        assert inside == (backend, dispatch.KernelOptions(**options), mine)
        assert nested == ("cuda" if name == "a" else backend) and end_inside == mine
    assert dispatch.snapshot() == DEFAULT  # and the main thread saw none of it


def test_restore_sets_and_then_resets_the_state():
    state = dispatch.Snapshot("triton", True, dispatch.KernelOptions(decode_max_tokens=5))
    with fp.ops.use_backend("torch"):
        with dispatch.restore(state):
            assert dispatch.snapshot() == state and dispatch.requested_backend() == "triton"
            assert fp.ops.kernel_options().decode_max_tokens == 5
        assert dispatch.requested_backend() == "torch" and fp.ops.kernel_options() == dispatch.KernelOptions()
    assert dispatch.snapshot() == DEFAULT
