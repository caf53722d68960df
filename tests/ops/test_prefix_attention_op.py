"""`fp.ops.prefix_attention`: its Triton forward and backward kernels (interpreter on CPU) against the float64
reference, outputs poisoned: causal and not, with and without key padding, a shared and a per-row prefix, no
prefix, decode (Lq = 1), grouped- and multi-query heads, no real keys, rows that see no key, odd lengths, head dims
64/80/96/128, every dtype; the log-sum-exp it keeps for the backward; every gradient (dq, dk, dv, dprefix_k,
dprefix_v), and the prefix alone (prefix tuning). The reference paths (head dims the kernel does not take, CPU
tensors without a forced backend), the op bodies under torch.compile, input checks. Every Triton test checks that
the kernels ran, so a silent fallback to the reference fails."""
from __future__ import annotations

import warnings

import pytest
import torch

import fastpeft as fp
from fastpeft.ops import attention as op
from fastpeft.reference.attention import prefix_attention as reference
from fastpeft.reference.attention import prefix_attention_fwd
from tests.harness import DEVICE, HAS_TRITON, TOLERANCE, check_op, needs_triton, rel_err



class _Launches(list):
    """Kernel launcher calls: "fwd", "dq", "dkdv"; `forwards` says which forward each "fwd" ran: "decode" (the
    split-K decode forward) or "full"."""

    def __init__(self):
        super().__init__()
        self.forwards = []


@pytest.fixture
def launches(monkeypatch):
    """One entry per kernel launcher call during the test: "fwd", "dq", "dkdv"."""
    seen = _Launches()
    if not HAS_TRITON:
        return seen
    kern = op._kernels()
    for name, tag in (("forward", "fwd"), ("forward_decode", "fwd"), ("backward_dq", "dq"),
                      ("backward_dkdv", "dkdv")):
        def spy(*args, _original=getattr(kern, name), _tag=tag, _name=name, **kwargs):
            seen.append(_tag)
            if _tag == "fwd":
                seen.forwards.append("decode" if _name == "forward_decode" else "full")
            return _original(*args, **kwargs)

        monkeypatch.setattr(kern, name, spy)
    return seen


def _attn_mask(kind, B, H, Lq, Lk, g):
    """An attn_mask over the real keys: "bool" (B, 1, Lq, Lk), "bool_bh" (B, H, Lq, Lk), "bool_2d" (Lq, Lk), random
    visibility; "bias" (1, H, Lq, Lk), "bias_b" (B, 1, Lq, Lk), a float32 position-bias-like term with a quarter of
    its entries hidden (−inf, or float32's lowest value as transformers' eager masks write it). With L_q > 1, query
    row 0 sees no real key."""
    shape = {"bool": (B, 1, Lq, Lk), "bool_bh": (B, H, Lq, Lk), "bool_2d": (Lq, Lk), "bias": (1, H, Lq, Lk),
             "bias_b": (B, 1, Lq, Lk)}[kind]
    hidden = torch.rand(shape, generator=g) < 0.25
    hidden[..., 0, :] |= Lq > 1
    if kind.startswith("bool"):
        return ~hidden
    bias = 2 * torch.randn(shape, generator=g)
    lowest = torch.rand(shape, generator=g) < 0.5
    bias = bias.masked_fill(hidden & lowest, float("-inf"))
    return bias.masked_fill(hidden & ~lowest, torch.finfo(torch.float32).min)


def _inputs(B, H, Hkv, Lq, Lk, P, D, dtype, *, Bp=1, mask=None, attn=None, seed=0):
    """Random q, k, v, prefix (None when P is None), key padding mask ("random" or a given bool tensor) and
    attn_mask (a kind of _attn_mask, or None)."""
    g = torch.Generator().manual_seed(seed + 7 * Lq + Lk + (P or 0))

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE, dtype)

    t = dict(q=rnd(B, H, Lq, D), k=rnd(B, Hkv, Lk, D), v=rnd(B, Hkv, Lk, D), prefix_k=None, prefix_v=None,
             key_padding_mask=None)
    if attn is not None:
        t["attn_mask"] = _attn_mask(attn, B, H, Lq, Lk, g).to(DEVICE)
    if P is not None:
        t["prefix_k"], t["prefix_v"] = rnd(Bp, Hkv, P, D), rnd(Bp, Hkv, P, D)
    if isinstance(mask, str):
        keep = torch.rand(B, Lk, generator=g) > 0.3
        keep[:, -1] = True  # the last key, visible to every causal row with the default offset
        t["key_padding_mask"] = keep.to(DEVICE)
    elif mask is not None:
        t["key_padding_mask"] = mask.to(DEVICE)
    return t


def _check_kernel(t, dtype, launches, **kw):
    """The kernel (forced, poisoned outputs) against the float64 reference: O, and LSE against the op body's."""
    B, H, Lq, D = t["q"].shape
    scale = kw.get("scale") or D ** -0.5
    causal = kw.get("causal", False)
    offset = kw.get("query_offset")
    offset = t["k"].shape[2] - Lq if offset is None else offset
    t64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in t.items()}
    ref = reference(**t64, **kw)
    with torch.no_grad(), fp.ops.use_backend("triton"), fp.ops.poison_outputs():
        out = fp.ops.prefix_attention(**t, **kw)
        o, lse = torch.ops.fastpeft.prefix_attention(t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"],
                                                     t["key_padding_mask"], scale, causal, offset, t.get("attn_mask"))
    assert launches == ["fwd", "fwd"]
    decode = op._kernels().decode_applies(Lq, H // t["k"].shape[1])
    assert launches.forwards == ["decode" if decode else "full"] * 2
    assert out.dtype == dtype and out.shape == (B, H, Lq, D)
    err = rel_err(out, ref)
    assert err <= TOLERANCE[dtype], f"relative error {err:.3e} ({dtype})"
    assert torch.equal(out, o)
    _, lse64 = prefix_attention_fwd(t64["q"], t64["k"], t64["v"], t64["prefix_k"], t64["prefix_v"],
                                    t["key_padding_mask"], scale, causal, offset, t64.get("attn_mask"))
    finite = torch.isfinite(lse64)
    assert lse.dtype == torch.float32 and lse.shape == (B, H, Lq)
    assert torch.equal(torch.isinf(lse), ~finite) and not torch.isnan(lse).any()
    assert (lse[finite].double() - lse64[finite]).abs().max().item() < (1e-5 if dtype == torch.float32 else 1e-2)
    return err


CASES = {  # (B, H, Hkv, Lq, Lk, P, D, dtype, extra)
    "plain": (2, 2, 2, 19, 23, 5, 64, torch.float32, {}),
    "causal_mask_per_row_prefix": (2, 2, 2, 13, 29, 6, 80, torch.float32,
                                   {"Bp": 2, "mask": "random", "causal": True}),
    "causal_shared_prefix_fp16": (1, 2, 2, 17, 17, 3, 80, torch.float16, {"causal": True}),
    "mask_not_causal_bf16": (2, 2, 1, 11, 21, 4, 64, torch.bfloat16, {"mask": "random"}),
    "no_prefix_causal_mask": (2, 2, 2, 9, 9, None, 64, torch.float32, {"mask": "random", "causal": True}),
    "prefix_of_zero_keys": (1, 2, 2, 7, 11, 0, 80, torch.float32, {"causal": True}),
    "decode_fp16": (2, 2, 1, 1, 33, 7, 64, torch.float16, {"causal": True, "mask": "random"}),
    "decode_no_prefix": (1, 2, 2, 1, 5, None, 80, torch.float32, {"causal": True}),
    "gqa_bf16": (1, 4, 2, 17, 29, 5, 80, torch.bfloat16, {"causal": True, "mask": "random"}),
    "gqa_fp32": (2, 4, 2, 10, 10, 3, 64, torch.float32, {"causal": True}),
    "mqa_offset": (1, 4, 1, 21, 21, 2, 64, torch.float32, {"causal": True, "query_offset": 3}),
    "no_real_keys": (2, 2, 2, 5, 0, 9, 64, torch.float16, {"causal": True}),
    "more_queries_than_keys": (1, 2, 2, 12, 5, 3, 80, torch.float32, {"causal": True}),
    "d96": (1, 2, 2, 8, 8, 3, 96, torch.float32, {"causal": True}),
    "d128_bf16": (1, 2, 1, 7, 7, 2, 128, torch.bfloat16, {"mask": "random"}),
}


@needs_triton
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_reference(case, launches):
    B, H, Hkv, Lq, Lk, P, D, dtype, extra = CASES[case]
    extra = dict(extra)
    t = _inputs(B, H, Hkv, Lq, Lk, P, D, dtype, Bp=extra.pop("Bp", 1), mask=extra.pop("mask", None))
    _check_kernel(t, dtype, launches, **extra)


@needs_triton
def test_rows_that_see_no_key_give_zero(launches):
    """No prefix, causal, the first keys padded: the first query rows see nothing (O = 0, LSE = +inf)."""
    keep = torch.ones(2, 12, dtype=torch.bool)
    keep[0, :4] = False
    t = _inputs(2, 2, 2, 12, 12, None, 64, torch.float32, mask=keep)
    _check_kernel(t, torch.float32, launches, causal=True)
    with torch.no_grad(), fp.ops.use_backend("triton"), fp.ops.poison_outputs():
        out = fp.ops.prefix_attention(**t, causal=True)
    assert (out[0, :, :4] == 0).all() and (out[0, :, 4:] != 0).any()


@needs_triton
def test_scale_and_integer_mask(launches):
    t = _inputs(1, 2, 2, 6, 14, 3, 64, torch.float32)
    t["key_padding_mask"] = (torch.arange(14) % 3 != 0).to(torch.int64)[None].to(DEVICE)
    _check_kernel(t, torch.float32, launches, scale=0.3, causal=True)


# ------------------------------------------------------------------------------------------------------------
# The backward kernels
# ------------------------------------------------------------------------------------------------------------

def _grad_inputs(dtype, B, H, Hkv, Lq, Lk, P, D, *, Bp=1, mask=None, attn=None,
                 leaves=("q", "k", "v", "prefix_k", "prefix_v")):
    t = _inputs(B, H, Hkv, Lq, Lk, P, D, dtype, Bp=Bp, mask=mask, attn=attn)
    for name in leaves:
        if t[name] is not None:
            t[name].requires_grad_()
    return t


GRAD_CASES = {  # (B, H, Hkv, Lq, Lk, P, D, dtype, extra)
    "causal_mask_shared_prefix_gqa": (2, 4, 2, 13, 17, 5, 64, torch.float32, {"mask": "random", "causal": True}),
    "per_row_prefix_fp16": (2, 2, 2, 9, 11, 3, 80, torch.float16, {"Bp": 2}),
    "per_row_prefix_causal_mask": (2, 2, 1, 7, 10, 4, 80, torch.float32, {"Bp": 2, "mask": "random",
                                                                          "causal": True}),
    "mqa_offset_bf16": (1, 4, 1, 11, 11, 2, 64, torch.bfloat16, {"causal": True, "query_offset": 3}),
    "no_prefix_causal_mask": (2, 2, 2, 9, 9, None, 64, torch.float32, {"mask": "random", "causal": True}),
    "prefix_of_zero_keys": (1, 2, 2, 7, 11, 0, 80, torch.float32, {"causal": True}),
    "decode_fp16": (2, 2, 1, 1, 19, 4, 64, torch.float16, {"causal": True, "mask": "random"}),
    "no_real_keys": (2, 2, 2, 5, 0, 9, 64, torch.float32, {"causal": True}),
    "odd_lengths": (1, 2, 2, 21, 23, 7, 80, torch.float32, {"mask": "random"}),
    "long_causal": (1, 2, 1, 37, 40, 3, 64, torch.float32, {"causal": True}),  # row blocks skipped per key tile
    "d96": (1, 2, 2, 6, 6, 3, 96, torch.float32, {"causal": True}),
    "d128_bf16": (1, 2, 1, 5, 7, 2, 128, torch.bfloat16, {"mask": "random"}),
}


@needs_triton
@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_backward_kernels_match_reference(case, launches):
    B, H, Hkv, Lq, Lk, P, D, dtype, extra = GRAD_CASES[case]
    extra = dict(extra)
    Bp, mask = extra.pop("Bp", 1), extra.pop("mask", None)
    errors = check_op(lambda **t: fp.ops.prefix_attention(**t, **extra),
                      lambda dt: _grad_inputs(dt, B, H, Hkv, Lq, Lk, P, D, Bp=Bp, mask=mask), dtype)
    expect = {"output", "dq", "dk", "dv"} | ({"dprefix_k", "dprefix_v"} if P is not None else set())
    assert set(errors) == expect
    assert launches == ["fwd", "dq", "dkdv"] + (["dkdv"] if P is not None else [])


@needs_triton
def test_backward_rows_that_see_no_key(launches):
    """No prefix, causal, the first keys padded: rows that see nothing get zero gradients (and no NaN)."""
    keep = torch.ones(2, 12, dtype=torch.bool)
    keep[0, :4] = False
    errors = check_op(lambda **t: fp.ops.prefix_attention(**t, causal=True),
                      lambda dt: _grad_inputs(dt, 2, 2, 2, 12, 12, None, 64, mask=keep), torch.float32)
    assert set(errors) == {"output", "dq", "dk", "dv"} and launches == ["fwd", "dq", "dkdv"]
    t = _grad_inputs(torch.float32, 2, 2, 2, 12, 12, None, 64, mask=keep)
    with fp.ops.use_backend("triton"), fp.ops.poison_outputs():
        fp.ops.prefix_attention(**t, causal=True).sum().backward()
    assert (t["q"].grad[0, :, :4] == 0).all() and torch.isfinite(t["k"].grad).all()


@needs_triton
@pytest.mark.parametrize("Bp", [1, 2])
def test_prefix_alone_requires_grad(Bp, launches):
    """Prefix tuning: only the prefix is trained; one dK/dV launch over the prefix, no dQ, no real-key launch."""
    errors = check_op(lambda **t: fp.ops.prefix_attention(**t, causal=True),
                      lambda dt: _grad_inputs(dt, 2, 4, 2, 9, 13, 6, 64, Bp=Bp, mask="random",
                                              leaves=("prefix_k", "prefix_v")), torch.float32)
    assert set(errors) == {"output", "dprefix_k", "dprefix_v"}
    assert launches == ["fwd", "dkdv"]


@needs_triton
def test_no_grad_mode_runs_forward_only(launches):
    t = _grad_inputs(torch.float32, 1, 2, 2, 5, 7, 3, 64)
    with torch.no_grad(), fp.ops.use_backend("triton"):
        out = fp.ops.prefix_attention(**t, causal=True)
    assert launches == ["fwd"] and not out.requires_grad


def test_compiled_backward_op_body_matches_reference():
    """The backward op body in PyTorch (CPU, torch.compile): every gradient against the reference's autograd."""
    assert_compiled_matches_reference(_grad_inputs(torch.float32, 2, 4, 2, 5, 9, 3, 64, mask="random"))


def assert_compiled_matches_reference(t: dict, names=("q", "k", "v", "prefix_k", "prefix_v")) -> None:
    """torch.compile(fullgraph) of the op on inputs t (causal): output and the gradients of `names` as the
    reference's autograd gives them."""
    fn = torch.compile(fp.ops.prefix_attention, fullgraph=True, backend="aot_eager")
    y = fn(**t, causal=True)
    grads = torch.autograd.grad(y, [t[n] for n in names], torch.ones_like(y))
    t2 = {n: (x.detach().requires_grad_() if n in names else x) for n, x in t.items()}
    y2 = reference(**t2, causal=True)
    grads2 = torch.autograd.grad(y2, [t2[n] for n in names], torch.ones_like(y2))
    assert rel_err(y, y2) < 1e-6
    for name, g, g2 in zip(names, grads, grads2):
        assert rel_err(g, g2) < 1e-5, name


# ------------------------------------------------------------------------------------------------------------
# attn_mask (bool or additive bias, broadcast through strides) and the 16-row decode block
# ------------------------------------------------------------------------------------------------------------

MASK_CASES = {  # (B, H, Hkv, Lq, Lk, P, D, dtype, extra): forward (with LSE) and every gradient
    "bool_b1hl": (2, 2, 2, 9, 13, 3, 64, torch.float32, {"attn": "bool"}),
    "bias_1h_with_padding": (2, 2, 2, 7, 11, 4, 64, torch.float32, {"attn": "bias", "mask": "random"}),
    "bool_bh_causal_padding_gqa_fp16": (2, 4, 2, 10, 13, 3, 80, torch.float16,
                                        {"attn": "bool_bh", "mask": "random", "causal": True}),
    "bias_per_row_prefix_causal_bf16": (2, 2, 1, 6, 9, 2, 64, torch.bfloat16,
                                        {"Bp": 2, "attn": "bias", "causal": True}),
    "decode_bias": (2, 2, 1, 1, 21, 5, 64, torch.float32, {"attn": "bias_b", "causal": True, "mask": "random"}),
    "decode7_bool_2d_no_prefix": (1, 2, 2, 7, 19, None, 64, torch.float32, {"attn": "bool_2d", "causal": True}),
    "odd_bias_gqa": (1, 4, 2, 5, 23, 7, 80, torch.float32, {"attn": "bias"}),
}


@needs_triton
@pytest.mark.parametrize("case", list(MASK_CASES))
def test_attn_mask_kernels_match_reference(case, launches):
    """attn_mask with the other masks, every shape kind: O and LSE, then every gradient, against float64."""
    B, H, Hkv, Lq, Lk, P, D, dtype, extra = MASK_CASES[case]
    extra = dict(extra)
    Bp, mask, attn = extra.pop("Bp", 1), extra.pop("mask", None), extra.pop("attn")
    _check_kernel(_inputs(B, H, Hkv, Lq, Lk, P, D, dtype, Bp=Bp, mask=mask, attn=attn), dtype, launches, **extra)
    launches.clear()
    errors = check_op(lambda **t: fp.ops.prefix_attention(**t, **extra),
                      lambda dt: _grad_inputs(dt, B, H, Hkv, Lq, Lk, P, D, Bp=Bp, mask=mask, attn=attn), dtype)
    assert set(errors) == {"output", "dq", "dk", "dv"} | ({"dprefix_k", "dprefix_v"} if P is not None else set())
    assert launches == ["fwd", "dq", "dkdv"] + (["dkdv"] if P is not None else [])


@needs_triton
def test_attn_mask_rows_that_see_no_key_and_expanded_masks(launches):
    """No prefix: query row 0 sees no key (attn_mask hides them all) and gives 0 with zero gradient. A mask given
    already expanded (stride 0) or in half precision reads the same."""
    t = _grad_inputs(torch.float32, 1, 2, 2, 5, 9, None, 64, attn="bias")
    expect = reference(**{n: (x.detach() if isinstance(x, torch.Tensor) else x) for n, x in t.items()})
    with fp.ops.use_backend("triton"), fp.ops.poison_outputs():
        out = fp.ops.prefix_attention(**t)
        out.sum().backward()
        same = fp.ops.prefix_attention(**{**t, "attn_mask": t["attn_mask"].expand(1, 2, 5, 9)})
        half = fp.ops.prefix_attention(**{**t, "attn_mask": t["attn_mask"].half()})
    assert launches == ["fwd", "dq", "dkdv", "fwd", "fwd"]
    assert (out[:, :, 0] == 0).all() and (t["q"].grad[:, :, 0] == 0).all() and torch.isfinite(t["k"].grad).all()
    assert rel_err(out, expect) < 1e-5 and torch.equal(out, same)
    assert rel_err(half, expect) < 1e-2


def test_decode_block_for_short_queries():
    """The forward prune keeps 16-row query blocks for L_q <= 16 (decode) and only taller ones above."""
    triton = pytest.importorskip("triton")
    kern = op._kernels()
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
               for bm, bn, w, st in kern._SHAPES + kern._DECODE_SHAPES]
    q = torch.empty(1, dtype=torch.bfloat16)
    for lq, rows in ((1, {16}), (16, {16}), (17, {64}), (64, {64, 128}), (4096, {64, 128})):
        kept = kern._prune(configs, {"q_ptr": q, "BLOCK_D": 128, "LQ_BUCKET": kern.bucket(lq)})
        assert {c.kwargs["BLOCK_M"] for c in kept} == rows, lq


@needs_triton
def test_reference_paths_for_dropout_and_a_learned_bias(launches):
    """dropout_p > 0 and an attn_mask that requires grad run the reference (autograd reaches the bias);
    dropout_p = 0 is the kernel."""
    t = _grad_inputs(torch.float32, 1, 2, 2, 4, 6, 2, 64, attn="bias")
    with fp.ops.use_backend("triton"):
        torch.manual_seed(1)
        a = fp.ops.prefix_attention(**t, dropout_p=0.3)
        torch.manual_seed(1)
        b = reference(**t, dropout_p=0.3)
        assert launches == [] and torch.equal(a, b)
        bias = t["attn_mask"].clone().requires_grad_()
        fp.ops.prefix_attention(**{**t, "attn_mask": bias}).sum().backward()
        assert launches == [] and bias.grad is not None and bias.grad.abs().sum() > 0
        with torch.no_grad():
            c = fp.ops.prefix_attention(**t, dropout_p=0.0)
        assert launches == ["fwd"] and rel_err(c, reference(**t)) < 1e-5


def test_torch_op_bodies_with_attn_mask_match_reference_autograd():
    """The registered op on the torch backend (the bodies torch.compile traces): output and gradients against the
    reference's autograd, with a bias, padding and causal masks."""
    t = _grad_inputs(torch.float64, 2, 4, 2, 5, 8, 3, 64, attn="bias", mask="random")
    names = ["q", "k", "v", "prefix_k", "prefix_v"]
    with fp.ops.use_backend("torch"):
        y = torch.ops.fastpeft.prefix_attention(t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"],
                                                t["key_padding_mask"], 0.125, True, 3, t["attn_mask"])[0]
    grads = torch.autograd.grad(y, [t[n] for n in names], torch.ones_like(y))
    y2 = reference(**t, scale=0.125, causal=True)
    grads2 = torch.autograd.grad(y2, [t[n] for n in names], torch.ones_like(y2))
    assert rel_err(y, y2) < 1e-12
    for name, g, g2 in zip(names, grads, grads2):
        assert rel_err(g, g2) < 1e-6, name  # the backward body reads the float32 LSE


# ------------------------------------------------------------------------------------------------------------
# The split-K decode forward (L_q <= 16): GQA group packed into the query tile, keys split, combine kernel
# ------------------------------------------------------------------------------------------------------------

DECODE_CASES = {  # (B, H, Hkv, Lq, Lk, P, D, dtype, extra, num_splits); interpreter tiles: 16 keys
    "lq1_mha_causal": (2, 2, 2, 1, 37, 5, 64, torch.float32, {"causal": True}, 3),
    "lq3_gqa2_per_row_prefix_offset": (2, 4, 2, 3, 29, 6, 64, torch.float32,
                                       {"Bp": 2, "causal": True, "query_offset": 20}, 3),
    "lq3_gqa4_padding_fp16": (1, 8, 2, 3, 33, 4, 64, torch.float16, {"mask": "random", "causal": True}, 1),
    "mqa_lq1_bool_bh": (2, 4, 1, 1, 25, 3, 64, torch.float32, {"attn": "bool_bh"}, 3),
    "lq3_gqa2_bias_many_splits_bf16": (2, 4, 2, 3, 21, 2, 64, torch.bfloat16, {"attn": "bias", "causal": True}, 16),
    "p0_padding_many_splits": (1, 2, 1, 3, 19, 0, 80, torch.float32, {"causal": True, "mask": "random"}, 16),
    "no_prefix_rows_see_nothing": (2, 2, 2, 3, 9, None, 64, torch.float32, {"causal": True, "query_offset": -1}, 3),
    "d128_bf16": (1, 4, 2, 1, 17, 3, 128, torch.bfloat16, {}, 3),
    "group_too_big_full_forward": (1, 8, 1, 9, 13, 2, 64, torch.float32, {"causal": True}, 3),  # 72 rows > 64
}


@needs_triton
@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_decode_forward_matches_reference(case, launches):
    """The decode forward through the op (outputs poisoned, the partials NaN-filled under the interpreter): O and
    LSE against float64 for 1, 3 and more splits than key tiles (empty chunks); rows that see nothing give 0."""
    B, H, Hkv, Lq, Lk, P, D, dtype, extra, splits = DECODE_CASES[case]
    extra = dict(extra)
    t = _inputs(B, H, Hkv, Lq, Lk, P, D, dtype, Bp=extra.pop("Bp", 1), mask=extra.pop("mask", None),
                attn=extra.pop("attn", None))
    with fp.ops.use_kernel_options(decode_splits=splits):
        _check_kernel(t, dtype, launches, **extra)
    assert launches.forwards == ["full" if H // Hkv * Lq > 64 else "decode"] * 2


@needs_triton
def test_decode_forward_feeds_the_backward(launches):
    """Training at L_q = 2 through the split forward (3 splits): its O and LSE drive the backward kernels; every
    gradient against float64."""
    with fp.ops.use_kernel_options(decode_splits=3):
        errors = check_op(lambda **t: fp.ops.prefix_attention(**t, causal=True),
                          lambda dt: _grad_inputs(dt, 2, 4, 2, 2, 19, 5, 64, mask="random", attn="bias"),
                          torch.float32)
    assert set(errors) == {"output", "dq", "dk", "dv", "dprefix_k", "dprefix_v"}
    assert launches == ["fwd", "dq", "dkdv", "dkdv"] and launches.forwards == ["decode"]


def test_decode_splits_fill_the_sms():
    """About two programs per SM, at least one key tile per split, one split when the batch fills the GPU."""
    pytest.importorskip("triton")
    kern = op._kernels()
    assert kern.decode_splits(132, 32, 1000) == 9 and kern.decode_splits(132, 1, 5) == 5
    assert kern.decode_splits(132, 512, 100) == 1 and kern.decode_splits(132, 8, 0) == 1
    assert kern.decode_applies(16, 4) and not kern.decode_applies(17, 1) and not kern.decode_applies(9, 8)


# ------------------------------------------------------------------------------------------------------------
# The reference paths
# ------------------------------------------------------------------------------------------------------------

@needs_triton
def test_unsupported_head_dim_warns_once_and_runs_the_reference(launches, monkeypatch):
    monkeypatch.setattr(op, "_warned_head_dims", set())
    t = _inputs(1, 2, 2, 5, 7, 3, 48, torch.float32)
    with torch.no_grad(), fp.ops.use_backend("triton"):
        with pytest.warns(UserWarning, match="head dim 48"):
            out = fp.ops.prefix_attention(**t)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fp.ops.prefix_attention(**t)
    assert launches == []
    assert rel_err(out, reference(**t)) == 0.0


def test_cpu_tensors_run_the_reference(launches):
    t = _inputs(1, 2, 2, 5, 7, 3, 64, torch.float32)
    out = fp.ops.prefix_attention(**t, causal=True)
    if DEVICE == "cpu":
        assert launches == []
    assert rel_err(out, reference(**t, causal=True)) < 1e-6


def test_compiled_op_body_matches_eager():
    t = _inputs(2, 4, 2, 5, 9, 3, 64, torch.float32, mask="random")
    fn = torch.compile(fp.ops.prefix_attention, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        y = fn(**t, causal=True)
    assert rel_err(y, reference(**t, causal=True)) < 1e-6


def test_op_body_lse_matches_float64_logsumexp():
    t = _inputs(1, 2, 1, 4, 6, 2, 64, torch.float64)
    _, lse = prefix_attention_fwd(t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"], None, 0.125, False, 0)
    keys = torch.cat([t["prefix_k"], t["k"]], 2).expand(1, 2, -1, -1)
    expect = torch.logsumexp(t["q"] @ keys.transpose(-1, -2) * 0.125, -1)
    assert (lse.double() - expect).abs().max() < 1e-5


# ------------------------------------------------------------------------------------------------------------
# Input checks
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, match", [
    (lambda t: t.update(q=t["q"][0]), "q has shape"),
    (lambda t: t.update(v=t["v"][:, :, :3]), "same shape"),
    (lambda t: t.update(k=t["k"][..., :32], v=t["v"][..., :32]), "same batch and head dim"),
    (lambda t: t.update(k=t["k"].repeat(1, 3, 1, 1)[:, :3], v=t["v"].repeat(1, 3, 1, 1)[:, :3]), "multiple"),
    (lambda t: t.update(prefix_v=None), "both prefix_k and prefix_v"),
    (lambda t: t.update(prefix_k=t["prefix_k"].repeat(3, 1, 1, 1), prefix_v=t["prefix_v"].repeat(3, 1, 1, 1)),
     "shared by the batch"),
    (lambda t: t.update(key_padding_mask=torch.ones(2, 3, dtype=torch.bool)), "key_padding_mask has shape"),
    (lambda t: t.update(key_padding_mask=torch.ones(2, 7)), "dtype"),
    (lambda t: t.update(k=t["k"].half(), v=t["v"].half()), "cast them"),
    (lambda t: t.update(query_offset=1.5), "query_offset"),
    (lambda t: t.update(attn_mask=torch.ones(2, 4, 5, 6, dtype=torch.bool)), r"attn_mask has shape \(2, 4, 5, 6\)"),
    (lambda t: t.update(attn_mask=torch.ones(2, 1, 5, 10)), r"attn_mask\[\.\.\., 3:\]"),
    (lambda t: t.update(attn_mask=torch.ones(1, 1, 1, 5, 7)), "broadcastable to"),
    (lambda t: t.update(attn_mask=torch.ones(2, 1, 5, 7, dtype=torch.int64)), r"\.bool\(\)"),
    (lambda t: t.update(attn_mask=torch.ones(2, 1, 5, 7, device="meta")), "attn_mask is on meta"),
    (lambda t: t.update(dropout_p=1.0), "dropout_p=1.0"),
    (lambda t: t.update(dropout_p=-0.1), "0 <= dropout_p < 1"),
    (lambda t: t.update(prefix_bias=torch.zeros(1, 4, 5, 7)), r"prefix_bias has shape \(1, 4, 5, 7\)"),
    (lambda t: t.update(prefix_bias=torch.zeros(1, 4, 5, 3, dtype=torch.bool)), "use a float tensor"),
], ids=["q_3d", "kv_mismatch", "head_dim", "heads", "half_prefix", "prefix_batch", "mask_shape", "mask_dtype",
        "dtype", "offset", "attn_mask_shape", "attn_mask_covers_prefix", "attn_mask_5d", "attn_mask_int",
        "attn_mask_device", "dropout_one", "dropout_negative", "prefix_bias_shape", "prefix_bias_dtype"])
def test_input_checks(change, match):
    t = _inputs(2, 4, 2, 5, 7, 3, 64, torch.float32)
    change(t)
    with pytest.raises(ValueError, match=match):
        fp.ops.prefix_attention(**t)
