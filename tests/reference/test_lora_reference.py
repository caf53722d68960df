"""Tier 1: the LoRA reference (fastpeft/reference/lora.py) against the formula written out here in float64.

    y = x Wᵀ + b + ((drop(x) Aᵀ) ⊙ s) Bᵀ

The oracle below is independent of the reference: plain float64 matmuls, the dropout mask taken from
fastpeft.reference.dropout.keep_mask, gradients from torch.autograd. The hand-written backward
(`lora_linear_bwd`) is compared with autograd of that oracle.
"""
from __future__ import annotations

import pytest
import torch

from fastpeft.reference import lora as ref
from fastpeft.reference.dropout import dropout, keep_mask, keep_threshold

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    """‖out − want‖ / ‖want‖ in float64; inf for non-finite output."""
    out, want = out.detach().double(), want.detach().double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - want).norm() / want.norm().clamp_min(1e-300)).item()


def formula64(x, weight, bias, lora_a, lora_b, scale, *, keep=None, p=0.0, fan_in_fan_out=False):
    """The LoRA linear written out in float64 (x may be N-D); keep is the (M, K) boolean dropout mask."""
    x, weight, a, b, s = (t.double() for t in (x, weight, lora_a, lora_b, scale))
    x2 = x.reshape(-1, x.shape[-1])
    w_nk = weight.t() if fan_in_fan_out else weight
    h = x2 if keep is None else x2 * keep.double() / (1.0 - p)
    y = x2 @ w_nk.t() + ((h @ a.t()) * s) @ b.t()
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*x.shape[:-1], y.shape[-1])


def make(M, K, N, R, dtype, *, bias=False, fan_in_fan_out=False, adapter_dtype=None, seed=0):
    """Random non-zero inputs: x (M, K), weight (N, K) or (K, N), bias, A (R, K), B (N, R), s (R,) per rank."""
    g = torch.Generator().manual_seed(seed)
    adt = adapter_dtype or dtype
    w = torch.randn(N, K, generator=g, dtype=torch.float64) / K**0.5
    return dict(
        x=torch.randn(M, K, generator=g, dtype=torch.float64).to(dtype),
        weight=(w.t().contiguous() if fan_in_fan_out else w).to(dtype),
        bias=torch.randn(N, generator=g, dtype=torch.float64).to(dtype) if bias else None,
        lora_a=(torch.randn(R, K, generator=g, dtype=torch.float64) / K**0.5).to(adt),
        lora_b=torch.randn(N, R, generator=g, dtype=torch.float64).to(adt),
        scale=(torch.rand(R, generator=g, dtype=torch.float64) + 0.5).to(
            torch.float64 if dtype == torch.float64 else torch.float32),
    )


CASES = {  # id: (M, K, N, R, options)
    "m1_r1": (1, 33, 17, 1, {}),
    "bias": (37, 29, 41, 3, {"bias": True}),
    "dropout": (40, 24, 19, 5, {"bias": True, "p": 0.3}),
    "fan_in_fan_out": (23, 18, 27, 4, {"bias": True, "fan_in_fan_out": True}),
    "fan_in_fan_out_dropout": (23, 18, 27, 4, {"fan_in_fan_out": True, "p": 0.5}),
}
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def _setup(case, dtype):
    M, K, N, R, opt = CASES[case]
    inp = make(M, K, N, R, dtype, bias=opt.get("bias", False), fan_in_fan_out=opt.get("fan_in_fan_out", False))
    p = opt.get("p", 0.0)
    seed = torch.tensor(1234 + M, dtype=torch.int64) if p else None
    keep = keep_mask(seed, M, K, p) if p else None
    if keep is not None:  # the test would be blind to the mask if it kept or dropped everything
        assert 0 < keep.sum() < keep.numel()
    return inp, p, seed, keep, opt.get("fan_in_fan_out", False)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", list(CASES))
def test_lora_linear_forward(case, dtype):
    """The differentiable reference `lora_linear` computes the formula."""
    inp, p, seed, keep, fifo = _setup(case, dtype)
    y = ref.lora_linear(**inp, seed=seed, dropout_p=p, fan_in_fan_out=fifo)
    want = formula64(**inp, keep=keep, p=p, fan_in_fan_out=fifo)
    assert y.dtype == dtype and y.shape == want.shape
    assert rel_err(y, want) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", list(CASES))
def test_lora_linear_fwd(case, dtype):
    """`lora_linear_fwd` returns y and T = drop(x) Aᵀ (float32 accumulators, float64 for float64 inputs)."""
    inp, p, seed, keep, fifo = _setup(case, dtype)
    x, a = inp["x"], inp["lora_a"]
    y, t, _ = ref.lora_linear_fwd(inp["x"], inp["weight"], inp["bias"], a, inp["lora_b"], inp["scale"], seed, p, fifo,
                               True)
    assert y.dtype == dtype and y.shape == (x.shape[0], inp["lora_b"].shape[0])
    assert t.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rel_err(y, formula64(**inp, keep=keep, p=p, fan_in_fan_out=fifo)) <= TOL[dtype]
    h = x.double() if keep is None else x.double() * keep / (1 - p)
    assert t.shape == (x.shape[0], a.shape[0])
    assert rel_err(t, h @ a.double().t()) <= TOL[dtype]
    y2, t2, _ = ref.lora_linear_fwd(inp["x"], inp["weight"], inp["bias"], a, inp["lora_b"], inp["scale"], seed, p,
                                 fifo, False)
    assert t2.numel() == 0 and torch.equal(y2, y)


def _autograd64(inp, keep, p, fifo, dy):
    """Gradients of the float64 formula w.r.t. x, A, B, s, bias by torch.autograd."""
    leaves = {k: v.detach().double().requires_grad_() for k, v in inp.items() if v is not None and k != "weight"}
    y = formula64(leaves["x"], inp["weight"], leaves.get("bias"), leaves["lora_a"], leaves["lora_b"],
                  leaves["scale"], keep=keep, p=p, fan_in_fan_out=fifo)
    grads = torch.autograd.grad(y, list(leaves.values()), dy.double())
    return dict(zip(leaves, grads))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", list(CASES))
def test_lora_linear_bwd(case, dtype):
    """The hand-written backward (dX, dA, dB, ds, dbias) equals autograd of the float64 formula."""
    inp, p, seed, keep, fifo = _setup(case, dtype)
    x, w, a, b, s = inp["x"], inp["weight"], inp["lora_a"], inp["lora_b"], inp["scale"]
    _, t, _ = ref.lora_linear_fwd(x, w, inp["bias"], a, b, s, seed, p, fifo, True)
    dy = torch.randn(x.shape[0], b.shape[0], dtype=torch.float64).to(dtype)
    dx, da, db, ds, dbias, _ = ref.lora_linear_bwd(dy, x, w, a, b, s, t, seed, p, fifo, (True,) * 5)
    want = _autograd64({**inp, "bias": torch.zeros(b.shape[0])}, keep, p, fifo, dy)
    tol = TOL[dtype]
    assert dx.dtype == dtype and da.dtype == a.dtype and db.dtype == b.dtype and ds.dtype == s.dtype
    assert dx.shape == x.shape and da.shape == a.shape and db.shape == b.shape and ds.shape == s.shape
    assert dbias.shape == (b.shape[0],)
    for name, got in (("x", dx), ("lora_a", da), ("lora_b", db), ("scale", ds), ("bias", dbias)):
        assert rel_err(got, want[name]) <= tol, f"d{name}: {rel_err(got, want[name]):.2e}"


@pytest.mark.parametrize("needs", [(True, False, False, False, False), (False, True, False, False, False),
                                   (False, False, True, False, False), (False, False, False, True, False),
                                   (False, False, False, False, True), (False, True, True, True, False)],
                         ids=["dx", "da", "db", "ds", "dbias", "adapters"])
def test_lora_linear_bwd_computes_only_what_is_needed(needs):
    """Gradients not asked for come back empty; the others are unchanged by what else is asked."""
    inp, p, seed, keep, fifo = _setup("dropout", torch.float64)
    x, w, a, b, s = inp["x"], inp["weight"], inp["lora_a"], inp["lora_b"], inp["scale"]
    _, t, _ = ref.lora_linear_fwd(x, w, inp["bias"], a, b, s, seed, p, fifo, True)
    dy = torch.randn(x.shape[0], b.shape[0], dtype=torch.float64)
    full = ref.lora_linear_bwd(dy, x, w, a, b, s, t, seed, p, fifo, (True,) * 5)
    part = ref.lora_linear_bwd(dy, x, w, a, b, s, t, seed, p, fifo, needs)
    for need, got, want in zip(needs, part, full):
        if need:
            assert torch.equal(got, want)
        else:
            assert got.numel() == 0


def test_reference_autograd_matches_hand_written_backward():
    """Autograd through `lora_linear` and `lora_linear_bwd` agree (float64, dropout, fan_in_fan_out)."""
    inp, p, seed, keep, fifo = _setup("fan_in_fan_out_dropout", torch.float64)
    leaves = {k: v.clone().requires_grad_() for k, v in inp.items() if v is not None and k != "weight"}
    y = ref.lora_linear(leaves["x"], inp["weight"], None, leaves["lora_a"], leaves["lora_b"], leaves["scale"],
                        seed, p, fifo)
    dy = torch.randn_like(y)
    auto = dict(zip(leaves, torch.autograd.grad(y, list(leaves.values()), dy)))
    _, t, _ = ref.lora_linear_fwd(inp["x"], inp["weight"], None, inp["lora_a"], inp["lora_b"], inp["scale"], seed, p,
                               fifo, True)
    dx, da, db, ds, _, _ = ref.lora_linear_bwd(dy, inp["x"], inp["weight"], inp["lora_a"], inp["lora_b"], inp["scale"],
                                            t, seed, p, fifo, (True, True, True, True, False))
    for name, got in (("x", dx), ("lora_a", da), ("lora_b", db), ("scale", ds)):
        assert rel_err(got, auto[name]) <= 1e-12, name


def test_dropout_uses_the_reference_mask():
    """drop(x) = x ⊙ keep / (1 − p) with keep from `keep_mask`; p = 0 (or no seed) is the identity."""
    x = torch.randn(13, 37, dtype=torch.float64)
    seed = torch.tensor(99)
    keep = keep_mask(seed, 13, 37, 0.4)
    assert 0 < keep.sum() < keep.numel()
    assert torch.equal(dropout(x, seed, 0.4), x * keep / 0.6)
    assert dropout(x, seed, 0.0) is x and dropout(x, None, 0.4) is x
    # the mask changes the result: the formula without it is far off
    inp = make(13, 37, 11, 2, torch.float64)
    inp["x"] = x
    y = ref.lora_linear(**inp, seed=seed, dropout_p=0.4, fan_in_fan_out=False)
    assert rel_err(y, formula64(**inp, keep=keep, p=0.4)) <= 1e-12
    assert rel_err(y, formula64(**inp)) > 1e-3


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_keep_threshold_rejects_p_outside_unit_interval(p):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        keep_threshold(p)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
def test_per_rank_scale_is_a_sum_of_adapters(dtype):
    """Two adapters concatenated along R with their own scales = the sum of the two LoRA deltas."""
    M, K, N, r1, r2 = 21, 26, 15, 3, 5
    one, two = make(M, K, N, r1, dtype, bias=True, seed=1), make(M, K, N, r2, dtype, seed=2)
    x, w, bias = one["x"], one["weight"], one["bias"]
    a = torch.cat([one["lora_a"], two["lora_a"]])
    b = torch.cat([one["lora_b"], two["lora_b"]], dim=1)
    s = torch.cat([torch.full((r1,), 2.0), torch.full((r2,), 0.25)]).to(one["scale"].dtype)
    seed, p = torch.tensor(7), 0.2
    keep = keep_mask(seed, M, K, p)
    want = (formula64(x, w, bias, one["lora_a"], one["lora_b"], torch.full((r1,), 2.0), keep=keep, p=p)
            + formula64(x, w, None, two["lora_a"], two["lora_b"], torch.full((r2,), 0.25), keep=keep, p=p)
            - x.double() @ w.double().t())
    y = ref.lora_linear(x, w, bias, a, b, s, seed, p, False)
    y_fwd, t, _ = ref.lora_linear_fwd(x, w, bias, a, b, s, seed, p, False, True)
    assert rel_err(y, want) <= TOL[dtype] and rel_err(y_fwd, want) <= TOL[dtype]
    # ds splits per adapter: ds_r = Σ_m T[m, r] G[m, r]
    dy = torch.randn(M, N, dtype=torch.float64).to(dtype)
    ds = ref.lora_linear_bwd(dy, x, w, a, b, s, t, seed, p, False, (False, False, False, True, False))[3]
    g = dy.double() @ b.double()
    t64 = (x.double() * keep / (1 - p)) @ a.double().t()
    assert rel_err(ds, (t64 * g).sum(0)) <= TOL[dtype]


@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["linear", "conv1d"])
def test_three_d_input(fan_in_fan_out):
    """`lora_linear` takes (..., K) inputs: (2, 5, K) gives (2, 5, N), rows flattened in order (mask included)."""
    B_, T_, K, N, R = 2, 5, 19, 23, 4
    inp = make(B_ * T_, K, N, R, torch.float32, bias=True, fan_in_fan_out=fan_in_fan_out)
    x3 = inp.pop("x").reshape(B_, T_, K)
    seed, p = torch.tensor(5), 0.25
    keep = keep_mask(seed, B_ * T_, K, p)
    y = ref.lora_linear(x3, **inp, seed=seed, dropout_p=p, fan_in_fan_out=fan_in_fan_out)
    assert y.shape == (B_, T_, N)
    assert rel_err(y, formula64(x3, **inp, keep=keep, p=p, fan_in_fan_out=fan_in_fan_out)) <= 1e-5
    # autograd through the reference gives the float64 formula's gradient w.r.t. the 3-D input
    x3g = x3.clone().requires_grad_()
    dy = torch.randn(B_, T_, N)
    (dx,) = torch.autograd.grad(ref.lora_linear(x3g, **inp, seed=seed, dropout_p=p, fan_in_fan_out=fan_in_fan_out),
                                x3g, dy)
    x64 = x3.double().requires_grad_()
    (dx64,) = torch.autograd.grad(formula64(x64, **inp, keep=keep, p=p, fan_in_fan_out=fan_in_fan_out), x64,
                                  dy.double())
    assert dx.shape == x3.shape and rel_err(dx, dx64) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d).split(".")[-1])
def test_float32_adapters_on_half_model(dtype):
    """fp32 A, B on a half-precision layer: y in the layer's dtype, dA and dB in float32, all near float64."""
    inp = make(30, 24, 20, 6, dtype, bias=True, adapter_dtype=torch.float32)
    seed, p = torch.tensor(3), 0.1
    keep = keep_mask(seed, 30, 24, p)
    x, w, a, b, s = inp["x"], inp["weight"], inp["lora_a"], inp["lora_b"], inp["scale"]
    y, t, _ = ref.lora_linear_fwd(x, w, inp["bias"], a, b, s, seed, p, False, True)
    assert y.dtype == dtype and rel_err(y, formula64(**inp, keep=keep, p=p)) <= 1e-2
    dy = torch.randn(30, 20).to(dtype)
    dx, da, db, ds, dbias, _ = ref.lora_linear_bwd(dy, x, w, a, b, s, t, seed, p, False, (True,) * 5)
    assert (dx.dtype, da.dtype, db.dtype, dbias.dtype) == (dtype, torch.float32, torch.float32, torch.float32)
    want = _autograd64(inp, keep, p, False, dy)
    for name, got in (("x", dx), ("lora_a", da), ("lora_b", db), ("scale", ds), ("bias", dbias)):
        assert rel_err(got, want[name]) <= 1e-2, name
