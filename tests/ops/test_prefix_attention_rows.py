"""Per-row prefix ranges of `fp.ops.prefix_attention` (prefix_offsets, prefix_lengths: multi-adapter batches, row b
sees the prefix keys [off_b, off_b + len_b)): the reference against its definition (each row alone with its slice,
float64); the Triton kernels under the interpreter against the float64 oracle, outputs poisoned, every gradient
(forward, dQ, dK/dV of a packed Bp = 1 prefix and of a Bp = B one, the split-K decode forward at L_q = 1 and 2):
several rows on one slice, rows of length 0, GQA/MQA, causal with key padding, odd sizes, every dtype; prefix keys
no row reads get exactly 0 gradient; the kernels clamp out-of-range values (never reading outside the prefix);
None gives today's kernels and results; the op bodies (torch backend, torch.compile); host validation."""
from __future__ import annotations

import pytest
import torch

import fastpeft as fp
from fastpeft.ops import attention as op
from fastpeft.reference.attention import prefix_attention as reference
from fastpeft.reference.attention import prefix_attention_fwd
from tests.harness import DEVICE, HAS_TRITON, TOLERANCE, check_op, needs_triton, rel_err
from tests.ops.test_prefix_attention_op import assert_compiled_matches_reference
from tests.ops.test_prefix_attention_op import launches  # noqa: F401  (fixture: the kernel launchers called)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _make(B, H, Hkv, Lq, Lk, P, D, dtype, *, Bp=1, offsets=None, lengths=None, mask=False, empty_row=None,
          attn=False, seed=0, leaves=()):
    """Random inputs (float64 drawn, then cast) with per-row ranges (lists, or None) as int32 tensors; `mask`: a
    random key padding mask (last key kept); `empty_row`: a row whose real keys are all padded (with length 0 it
    sees no key at all); `attn`: a float32 additive attn_mask (1, H, Lq, Lk)."""
    g = torch.Generator().manual_seed(seed + 11 * B + 7 * Lq + Lk + P)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE, dtype)

    t = dict(q=rnd(B, H, Lq, D), k=rnd(B, Hkv, Lk, D), v=rnd(B, Hkv, Lk, D), prefix_k=rnd(Bp, Hkv, P, D),
             prefix_v=rnd(Bp, Hkv, P, D), key_padding_mask=None,
             prefix_offsets=None if offsets is None else torch.tensor(offsets, dtype=torch.int32, device=DEVICE),
             prefix_lengths=None if lengths is None else torch.tensor(lengths, dtype=torch.int32, device=DEVICE))
    if mask or empty_row is not None:
        keep = torch.rand(B, Lk, generator=g) > 0.3 if mask else torch.ones(B, Lk, dtype=torch.bool)
        keep[:, -1:] = True
        if empty_row is not None:
            keep[empty_row] = False
        t["key_padding_mask"] = keep.to(DEVICE)
    if attn:
        t["attn_mask"] = (2 * torch.randn(1, H, Lq, Lk, generator=g)).to(DEVICE)
    for name in leaves:
        t[name].requires_grad_()
    return t


def _slices(t):
    """[(batch row of the prefix, offset, length)] per row, the defaults filled in (values assumed in range)."""
    B, P, Bp = t["q"].shape[0], t["prefix_k"].shape[2], t["prefix_k"].shape[0]
    off = [0] * B if t["prefix_offsets"] is None else t["prefix_offsets"].tolist()
    lengths = [P - o for o in off] if t["prefix_lengths"] is None else t["prefix_lengths"].tolist()
    return [(b if Bp == B else 0, off[b], lengths[b]) for b in range(B)]


def _per_row_loop(t, **kw):
    """The definition: row b alone, with its slice prefix_k[b or 0, :, off_b : off_b + len_b] as its prefix."""
    outs = []
    for b, (pb, o, n) in enumerate(_slices(t)):
        row = {name: (x[b:b + 1] if name in ("q", "k", "v", "key_padding_mask") and x is not None else x)
               for name, x in t.items() if name not in ("prefix_offsets", "prefix_lengths")}
        row["prefix_k"] = t["prefix_k"][pb:pb + 1, :, o:o + n]
        row["prefix_v"] = t["prefix_v"][pb:pb + 1, :, o:o + n]
        outs.append(reference(**row, **kw))
    return torch.cat(outs)


# ------------------------------------------------------------------------------------------------------------
# The reference
# ------------------------------------------------------------------------------------------------------------

REFERENCE_CASES = {  # (B, H, Hkv, Lq, Lk, P, Bp, offsets, lengths, extra)
    "packed": (4, 4, 2, 5, 7, 9, 1, [0, 5, 0, 3], [5, 3, 5, 0], {"causal": True, "mask": True}),
    "per_row_lengths": (3, 2, 1, 4, 6, 6, 3, None, [6, 2, 0], {"mask": True, "attn": True}),
    "per_row_offsets_lengths": (3, 2, 2, 3, 5, 7, 3, [1, 0, 4], [5, 7, 3], {"causal": True, "query_offset": 1}),
    "offsets_only": (2, 2, 2, 4, 4, 8, 1, [5, 0], None, {}),
    "no_key_at_all": (2, 2, 2, 3, 4, 5, 1, [0, 2], [2, 0], {"empty_row": 1}),
}


@pytest.mark.parametrize("case", list(REFERENCE_CASES))
def test_reference_is_a_loop_over_rows_with_their_slices(case):
    """float64: the batched reference with ranges equals each row alone with its slice as its prefix, output and
    every gradient (a packed prefix's gradient sums the rows that read each key; others get 0)."""
    B, H, Hkv, Lq, Lk, P, Bp, offsets, lengths, extra = REFERENCE_CASES[case]
    extra = dict(extra)
    make = {n: extra.pop(n) for n in ("mask", "attn", "empty_row") if n in extra}
    names = ("q", "k", "v", "prefix_k", "prefix_v")
    t = _make(B, H, Hkv, Lq, Lk, P, 8, torch.float64, Bp=Bp, offsets=offsets, lengths=lengths, leaves=names, **make)
    out = reference(**t, **extra)
    expect = _per_row_loop(t, **extra)
    assert torch.allclose(out, expect, atol=1e-12, rtol=0)
    w = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, [t[n] for n in names], w)
    grads2 = torch.autograd.grad(expect, [t[n] for n in names], w, allow_unused=True)
    for name, g1, g2 in zip(names, grads, grads2):
        assert torch.allclose(g1, torch.zeros_like(g1) if g2 is None else g2, atol=1e-12, rtol=0), name
    if make.get("empty_row") is not None:
        assert (out[make["empty_row"]] == 0).all()


def test_reference_clamps_out_of_range_values():
    """Offsets clamp into [0, P] and lengths into [0, P - off], as the kernels do."""
    t = _make(4, 2, 2, 3, 4, 6, 8, torch.float64, offsets=[-3, 4, 9, 2], lengths=[4, 100, 2, -5])
    clamped = {**t, "prefix_offsets": torch.tensor([0, 4, 6, 2]), "prefix_lengths": torch.tensor([4, 2, 0, 0])}
    assert torch.equal(reference(**t), reference(**clamped))


def test_full_ranges_are_the_default():
    """Offsets 0 and lengths P (or either alone at its default) give exactly the reference without ranges."""
    t = _make(2, 2, 2, 3, 5, 4, 8, torch.float64)
    base = reference(**t, causal=True)
    for off, lengths in (([0, 0], [4, 4]), ([0, 0], None), (None, [4, 4])):
        ranged = _make(2, 2, 2, 3, 5, 4, 8, torch.float64, offsets=off, lengths=lengths)
        assert torch.equal(reference(**ranged, causal=True), base)


# ------------------------------------------------------------------------------------------------------------
# The Triton kernels under the interpreter
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture
def row_flags(monkeypatch):
    """PREFIX_ROWS of every kernel launch in the test, by kernel name."""
    seen = []
    if not HAS_TRITON:
        return seen
    kern = op._kernels()

    def spy(kernel, _original=kern.launch):
        launched = _original(kernel)

        class Grid:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    seen.append((getattr(kernel, "fn", kernel).__name__, kwargs.get("PREFIX_ROWS")))
                    return launched[grid](*args, **kwargs)
                return run

        return Grid()

    monkeypatch.setattr(kern, "launch", spy)
    return seen


def _check_forward(t, dtype, **kw):
    """O and LSE of the kernels (outputs poisoned) against float64: O against the reference, LSE against the op
    body's; rows that see no key give O = 0 and LSE = +inf."""
    B, H, Lq, D = t["q"].shape
    scale, causal = D ** -0.5, kw.get("causal", False)
    offset = kw.get("query_offset", t["k"].shape[2] - Lq)
    t64 = {n: (x.detach().double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x)
           for n, x in t.items()}
    with torch.no_grad(), fp.ops.use_backend("triton"), fp.ops.poison_outputs():
        out = fp.ops.prefix_attention(**t, **kw)
        o, lse = torch.ops.fastpeft.prefix_attention(
            t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"], t["key_padding_mask"], scale, causal, offset,
            t.get("attn_mask"), t["prefix_offsets"], t["prefix_lengths"])
    assert torch.equal(out, o)
    err = rel_err(out, reference(**t64, **kw))
    assert err <= TOLERANCE[dtype], f"relative error {err:.3e} ({dtype})"
    _, lse64 = prefix_attention_fwd(t64["q"], t64["k"], t64["v"], t64["prefix_k"], t64["prefix_v"],
                                    t["key_padding_mask"], scale, causal, offset, t64.get("attn_mask"),
                                    t["prefix_offsets"], t["prefix_lengths"])
    finite = torch.isfinite(lse64)
    assert torch.equal(torch.isinf(lse), ~finite) and not torch.isnan(lse).any()
    assert (lse[finite].double() - lse64[finite]).abs().max().item() < (1e-5 if dtype == F32 else 1e-2)
    assert (out[~finite] == 0).all()


def _unread(t):
    """(Bp, P) bool: prefix keys that no batch row's range covers."""
    Bp, P = t["prefix_k"].shape[0], t["prefix_k"].shape[2]
    read = torch.zeros(Bp, P, dtype=torch.bool)
    for pb, o, n in _slices(t):
        read[pb, o:o + n] = True
    return ~read


KERNEL_CASES = {  # (B, H, Hkv, Lq, Lk, P, D, dtype, Bp, offsets, lengths, extra); interpreter tiles: 16 x 16
    # packed: 3 rows on 2 slices (5 and 3 keys) + a row of length 0; keys 8, 9 read by no row
    "packed_gqa_causal_padding_fp32": (4, 4, 2, 7, 9, 10, 64, F32, 1, [0, 5, 0, 2], [5, 3, 5, 0],
                                       {"causal": True, "mask": True}),
    "packed_fp16": (4, 2, 2, 5, 6, 8, 80, F16, 1, [5, 0, 5, 3], [3, 5, 3, 0], {}),
    "packed_mqa_causal_padding_bf16": (4, 2, 1, 7, 9, 8, 64, BF16, 1, [0, 5, 5, 0], [5, 3, 3, 0],
                                       {"causal": True, "mask": True}),
    # Bp = B padded to the longest prefix (lengths only), a row seeing no key at all (length 0, keys padded)
    "per_row_lengths_causal_fp32": (3, 2, 2, 7, 9, 6, 64, F32, 3, None, [6, 2, 0],
                                    {"causal": True, "mask": True, "empty_row": 2}),
    "per_row_offsets_gqa_bf16": (3, 4, 2, 6, 7, 7, 64, BF16, 3, [1, 0, 4], [5, 7, 3], {"mask": True}),
    "offsets_only_bias_fp16": (2, 2, 2, 5, 9, 8, 64, F16, 1, [5, 0], None, {"attn": True}),
    "slices_past_one_tile_fp32": (2, 2, 2, 3, 4, 40, 64, F32, 1, [3, 19], [21, 21], {"causal": True}),
    "no_real_keys_fp32": (3, 2, 2, 4, 0, 8, 64, F32, 1, [0, 5, 2], [5, 0, 3], {}),
    "long_queries_fp32": (2, 2, 1, 17, 19, 9, 64, F32, 1, [5, 0], [3, 5], {"causal": True, "mask": True}),
}


def _split(extra):
    extra = dict(extra)
    return {n: extra.pop(n) for n in ("mask", "attn", "empty_row") if n in extra}, extra


@needs_triton
@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_kernels_match_reference(case, launches, row_flags, monkeypatch):  # noqa: F811
    """Forward (O, LSE) and every gradient against float64; the ranged kernels ran; unread keys get exactly 0.
    The full forward kernel even at L_q <= 16 (the decode forward has its own cases below)."""
    monkeypatch.setattr(op._kernels(), "decode_applies", lambda lq, group: False)
    B, H, Hkv, Lq, Lk, P, D, dtype, Bp, offsets, lengths, extra = KERNEL_CASES[case]
    make, kw = _split(extra)
    rows = dict(Bp=Bp, offsets=offsets, lengths=lengths, **make)
    t = _make(B, H, Hkv, Lq, Lk, P, D, dtype, **rows)
    _check_forward(t, dtype, **kw)
    assert launches == ["fwd", "fwd"] and launches.forwards == ["full"] * 2
    launches.clear()
    leaves = ("q", "k", "v", "prefix_k", "prefix_v")
    errors = check_op(lambda **x: fp.ops.prefix_attention(**x, **kw),
                      lambda dt: _make(B, H, Hkv, Lq, Lk, P, D, dt, leaves=leaves, **rows), dtype)
    assert set(errors) == {"output", "dq", "dk", "dv", "dprefix_k", "dprefix_v"}
    assert launches == ["fwd", "dq", "dkdv", "dkdv"]
    ranged = {name for name, flag in row_flags if flag}
    assert ranged == {"prefix_attention_fwd_kernel", "prefix_attention_bwd_dq_kernel",
                      "prefix_attention_bwd_dkdv_kernel"}
    dkdv = [flag for name, flag in row_flags if name == "prefix_attention_bwd_dkdv_kernel"]
    assert dkdv == ([False, True] if Lk else [True])  # the real keys' launch (none without any), the prefix's
    # gradients of prefix keys no row reads: exactly 0, written (outputs poisoned)
    g = _make(B, H, Hkv, Lq, Lk, P, D, dtype, leaves=("prefix_k", "prefix_v"), **rows)
    with fp.ops.use_backend("triton"), fp.ops.poison_outputs():
        out = fp.ops.prefix_attention(**g, **kw)
        dpk, dpv = torch.autograd.grad(out, [g["prefix_k"], g["prefix_v"]], torch.randn_like(out))
    unread = _unread(g).to(DEVICE)
    for grad in (dpk, dpv):
        assert torch.isfinite(grad).all()
        assert (grad.transpose(1, 2)[unread] == 0).all() and (grad.transpose(1, 2)[~unread] != 0).any()


DECODE_CASES = {  # (B, H, Hkv, Lq, Lk, P, D, dtype, Bp, offsets, lengths, extra, num_splits)
    "lq1_packed_gqa_causal_padding_fp32": (4, 4, 2, 1, 21, 10, 64, F32, 1, [0, 5, 0, 2], [5, 3, 5, 0],
                                           {"causal": True, "mask": True}, 3),
    "lq2_per_row_lengths_bf16": (3, 4, 2, 2, 19, 20, 64, BF16, 3, None, [20, 3, 0], {"causal": True}, 3),
    "lq1_packed_many_splits_fp16": (2, 2, 1, 1, 9, 24, 64, F16, 1, [17, 0], [7, 17], {"mask": True}, 16),
    "lq2_packed_one_split_bias_fp32": (3, 2, 2, 2, 7, 9, 80, F32, 1, [0, 5, 0], [5, 3, 0], {"attn": True}, 1),
    "lq1_host_splits_fp32": (2, 2, 2, 1, 33, 40, 64, F32, 1, [3, 0], [5, 35], {"causal": True}, None),
}


@needs_triton
@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_decode_forward_matches_reference(case, launches, row_flags):  # noqa: F811
    """The split-K decode forward with per-row ranges (1, 3, many splits, the host's choice): O and LSE against
    float64, and every gradient through it."""
    B, H, Hkv, Lq, Lk, P, D, dtype, Bp, offsets, lengths, extra, splits = DECODE_CASES[case]
    make, kw = _split(extra)
    rows = dict(Bp=Bp, offsets=offsets, lengths=lengths, **make)
    with fp.ops.use_kernel_options(decode_splits=splits):
        _check_forward(_make(B, H, Hkv, Lq, Lk, P, D, dtype, **rows), dtype, **kw)
        assert launches.forwards == ["decode"] * 2
        assert ("prefix_attention_decode_kernel", True) in row_flags
        launches.clear()
        launches.forwards.clear()
        errors = check_op(lambda **x: fp.ops.prefix_attention(**x, **kw),
                          lambda dt: _make(B, H, Hkv, Lq, Lk, P, D, dt, leaves=("q", "k", "v", "prefix_k", "prefix_v"),
                                           **rows), dtype)
    assert set(errors) == {"output", "dq", "dk", "dv", "dprefix_k", "dprefix_v"}
    assert launches == ["fwd", "dq", "dkdv", "dkdv"] and launches.forwards == ["decode"]


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU lengths and the interpreter's 16-key tiles")
def test_decode_splits_sized_for_the_longest_range(monkeypatch):
    """CPU lengths: the host sizes the split grid for the longest (clamped) range, not P."""
    pytest.importorskip("triton")
    kern = op._kernels()
    grids = []

    class Capture:  # kernel[grid](...) records the grid and runs nothing
        def __getitem__(self, grid):
            return lambda *args, **kwargs: grids.append(grid)

    monkeypatch.setattr(kern, "launch", lambda kernel: Capture())
    monkeypatch.setattr(kern, "decode_splits", lambda sms, programs, tiles: tiles)  # one split per tile
    t = _make(2, 2, 2, 1, 16, 64, 64, F32, offsets=[0, 60], lengths=[16, 10])  # 16 keys and 4 (clamped)
    o, lse = torch.empty_like(t["q"]), torch.empty(2, 2, 1)
    kern.forward_decode(t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"], o, lse, scale=0.125,
                        prefix_offsets=t["prefix_offsets"], prefix_lengths=t["prefix_lengths"])
    kern.forward_decode(t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"], o, lse, scale=0.125)
    assert grids[0][0] == 2 and grids[2][0] == 5  # interpreter tiles of 16 keys: 1 + 1, then 4 + 1


@needs_triton
def test_prefix_gradient_alone_packed(launches):  # noqa: F811
    """Prefix tuning with packed adapters: only the prefix requires grad: one dK/dV launch over the prefix."""
    errors = check_op(lambda **x: fp.ops.prefix_attention(**x, causal=True),
                      lambda dt: _make(4, 4, 2, 5, 7, 8, 64, dt, offsets=[0, 5, 0, 5], lengths=[5, 3, 5, 3],
                                       mask=True, leaves=("prefix_k", "prefix_v")), F32)
    assert set(errors) == {"output", "dprefix_k", "dprefix_v"}
    assert launches == ["fwd", "dkdv"]


@needs_triton
@pytest.mark.parametrize("decode", [False, True])
def test_kernels_clamp_out_of_range_values(decode, launches, monkeypatch):  # noqa: F811
    """The registered op (no host validation there) with offsets and lengths past the prefix: the kernels clamp
    them as the reference does (never reading outside the prefix), forward (full or decode) and every gradient."""
    if not decode:
        monkeypatch.setattr(op._kernels(), "decode_applies", lambda lq, group: False)
    Lq = 1 if decode else 5
    names = ("q", "k", "v", "prefix_k", "prefix_v")
    t = _make(4, 2, 2, Lq, 6, 8, 64, F32, offsets=[-3, 6, 100, 2], lengths=[5, 100, 3, -4], leaves=names)
    args = (t["key_padding_mask"], 0.125, True, 6 - Lq, None, t["prefix_offsets"], t["prefix_lengths"])
    with fp.ops.use_backend("triton"), fp.ops.poison_outputs():
        out = torch.ops.fastpeft.prefix_attention(*(t[n] for n in names), *args)[0]
        w = torch.randn_like(out)
        grads = torch.autograd.grad(out, [t[n] for n in names], w)
    assert launches.forwards == ["decode" if decode else "full"]
    t64 = {n: (x.detach().double().requires_grad_() if n in names else x) for n, x in t.items()}
    clamped = {"prefix_offsets": torch.tensor([0, 6, 8, 2]), "prefix_lengths": torch.tensor([5, 2, 0, 0])}
    expect = reference(**{**t64, **clamped}, scale=0.125, causal=True)
    assert torch.equal(reference(**t64, scale=0.125, causal=True), expect)
    grads64 = torch.autograd.grad(expect, [t64[n] for n in names], w.double())
    assert rel_err(out, expect) < 1e-5
    for name, g, g64 in zip(names, grads, grads64):
        assert rel_err(g, g64) < 1e-5, name


@needs_triton
def test_none_is_todays_path_and_full_ranges_match_it(launches, row_flags):  # noqa: F811
    """Offsets and lengths of None launch the kernels without ranges (PREFIX_ROWS off: today's code), and full
    ranges given explicitly (int64, as torch.tensor makes them) give the same output and gradients bit for bit."""
    names = ("q", "k", "v", "prefix_k", "prefix_v")
    results = []
    for off, lengths in ((None, None), ([0, 0], [6, 6])):
        t = _make(2, 4, 2, 5, 7, 6, 64, F32, offsets=off, lengths=lengths, mask=True, leaves=names)
        for name in ("prefix_offsets", "prefix_lengths"):
            t[name] = None if t[name] is None else t[name].long()
        with fp.ops.use_backend("triton"), fp.ops.poison_outputs():
            out = fp.ops.prefix_attention(**t, causal=True)
            results.append((out, *torch.autograd.grad(out, [t[n] for n in names], torch.ones_like(out))))
        assert {flag for name, flag in row_flags if name != "prefix_attention_bwd_dkdv_kernel"} == {off is not None}
        assert [flag for name, flag in row_flags if name == "prefix_attention_bwd_dkdv_kernel"] == [False,
                                                                                                    off is not None]
        row_flags.clear()
    for a, b in zip(*results):
        assert torch.equal(a, b)
    t = _make(2, 4, 2, 5, 7, 6, 64, F32, mask=True)
    assert torch.equal(results[0][0], _plain_kernel_output(t))


def _plain_kernel_output(t):
    with torch.no_grad(), fp.ops.use_backend("triton"):
        return fp.ops.prefix_attention(t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"], causal=True,
                                       key_padding_mask=t["key_padding_mask"])


@needs_triton
def test_integer_dtypes_are_accepted(launches):  # noqa: F811
    """int64 and int16 ranges run the kernels like int32 ones (converted to int32 for them)."""
    t = _make(3, 2, 2, 4, 5, 8, 64, F32, offsets=[0, 5, 2], lengths=[5, 3, 0])
    with torch.no_grad(), fp.ops.use_backend("triton"):
        outs = [fp.ops.prefix_attention(**{**t, "prefix_offsets": t["prefix_offsets"].to(dt),
                                           "prefix_lengths": t["prefix_lengths"].to(dt)})
                for dt in (torch.int32, torch.int64, torch.int16)]
    assert launches == ["fwd"] * 3
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    # int64 values past int32 (the registered op: no host check) clamp, never wrap: offset 2^32 + 1 is past P
    big = {"prefix_offsets": torch.tensor([2**32 + 1, 0, 2]), "prefix_lengths": torch.tensor([3, 2**33, -2**40])}
    args = (t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"], None, 0.125, False, 1, None)
    with torch.no_grad(), fp.ops.use_backend("triton"):
        out = torch.ops.fastpeft.prefix_attention(*args, big["prefix_offsets"], big["prefix_lengths"])[0]
    expect = reference(**{**t, "prefix_offsets": torch.tensor([8, 0, 2]), "prefix_lengths": torch.tensor([0, 8, 0])},
                       scale=0.125)
    assert rel_err(out, expect) < 1e-5 and torch.equal(reference(**{**t, **big}, scale=0.125), expect)


# ------------------------------------------------------------------------------------------------------------
# The op bodies (torch backend, torch.compile) and host validation
# ------------------------------------------------------------------------------------------------------------

def test_torch_op_bodies_match_reference_autograd():
    """The registered op on the torch backend (forward and backward bodies) with ranges: output and every gradient
    against the reference's autograd, float64."""
    names = ("q", "k", "v", "prefix_k", "prefix_v")
    t = _make(4, 4, 2, 5, 8, 9, 64, torch.float64, offsets=[0, 5, 0, 3], lengths=[5, 3, 5, 0], mask=True,
              leaves=names)
    with fp.ops.use_backend("torch"):
        y = torch.ops.fastpeft.prefix_attention(*(t[n] for n in names), t["key_padding_mask"], 0.125, True, 3, None,
                                                t["prefix_offsets"], t["prefix_lengths"])[0]
    grads = torch.autograd.grad(y, [t[n] for n in names], torch.ones_like(y))
    y2 = reference(**t, scale=0.125, causal=True)
    grads2 = torch.autograd.grad(y2, [t[n] for n in names], torch.ones_like(y2))
    assert rel_err(y, y2) < 1e-12
    for name, g, g2 in zip(names, grads, grads2):
        assert rel_err(g, g2) < 1e-6, name
    assert (grads[3][:, :, 8] == 0).all()  # key 8: no row's range


def test_compiled_op_with_ranges_matches_reference():
    """torch.compile (fullgraph) through the op with ranges on CPU: output and gradients as the reference."""
    names = ("q", "k", "v", "prefix_k", "prefix_v")
    t = _make(3, 4, 2, 5, 9, 8, 64, F32, offsets=[5, 0, 2], lengths=[3, 5, 0], mask=True, leaves=names)
    assert_compiled_matches_reference(t, names)


def _set(name, value):
    return lambda t: t.update({name: value})


@pytest.mark.parametrize("change, match", [
    (_set("prefix_offsets", torch.zeros(2, 1, dtype=torch.int32)), r"prefix_offsets has shape \(2, 1\); expected"),
    (_set("prefix_lengths", torch.zeros(3, dtype=torch.int32)), r"prefix_lengths has shape \(3,\); expected \(B,\)"),
    (_set("prefix_lengths", [1, 2]), "prefix_lengths has shape list"),
    (_set("prefix_offsets", torch.zeros(2)), r"prefix_offsets has dtype torch.float32; use an integer tensor"),
    (_set("prefix_lengths", torch.ones(2, dtype=torch.bool)), "prefix_lengths has dtype torch.bool"),
    (_set("prefix_offsets", torch.zeros(2, dtype=torch.int32, device="meta")), "prefix_offsets is on meta"),
    (lambda t: t.update(prefix_k=None, prefix_v=None), "prefix_offsets is given but there is no prefix"),
    (_set("prefix_offsets", torch.tensor([0, -1])), "prefix_offsets of row 1 is negative"),
    (_set("prefix_lengths", torch.tensor([-2, 1])), "prefix_lengths of row 0 is negative"),
    (_set("prefix_offsets", torch.tensor([0, 9])), r"prefix_offsets of row 1 exceeds P = 8 \(offset 9"),
    (_set("prefix_lengths", torch.tensor([3, 6])), r"prefix_offsets \+ prefix_lengths of row 1 exceeds P = 8"),
], ids=["offsets_2d", "lengths_batch", "lengths_list", "offsets_float", "lengths_bool", "offsets_device",
        "no_prefix", "offset_negative", "length_negative", "offset_past_p", "slice_past_p"])
def test_input_checks(change, match):
    t = _make(2, 4, 2, 5, 7, 8, 64, F32, offsets=[0, 5], lengths=[5, 3])
    change(t)
    with pytest.raises(ValueError, match=match):
        fp.ops.prefix_attention(**t)


def test_values_in_range_pass_and_lengths_default_to_the_rest():
    """Offsets alone: each row's prefix runs to the end (no off + len > P error); slices touching P pass."""
    t = _make(2, 2, 2, 3, 4, 8, 64, F32, offsets=[8, 3])
    out = fp.ops.prefix_attention(**t)
    assert rel_err(out, _per_row_loop(t)) < 1e-6
    fp.ops.prefix_attention(**{**t, "prefix_offsets": torch.tensor([0, 5]), "prefix_lengths": torch.tensor([8, 3])})
