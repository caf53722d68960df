"""`fp.ops.bottleneck_adapter`: its Triton paths (interpreter on CPU) against the float64 reference, forward and
every gradient, outputs poisoned: the fused single-pass kernels for each activation and dtype, odd shapes, scalar,
learned and per-channel scaling, the layer norms before and after (both fused, the residual before or after the
norm), partial gradients; the two-kernel path of wide bottlenecks; the reference for gating and dropout; the
PyTorch op body under torch.compile; input checks.
Every Triton test also checks which kernels ran, so a silent fallback to the reference fails."""
from __future__ import annotations


import pytest
import torch

import fastpeft as fp
from fastpeft.ops import bottleneck as op
from fastpeft.kernels import limits
from fastpeft.kernels.limits import ACTIVATIONS, BOTTLENECK_MAX_WIDTH
from fastpeft.reference import bottleneck as reference
from tests.harness import DEVICE, HAS_TRITON, check_op, needs_triton, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def launches(monkeypatch):
    """Names of the kernel launchers called during the test ("fused fwd", "fused bwd", "shrink", ...; the fused
    kernels with the layer norm after fused are "fused fwd+ln_after", "fused bwd+ln_after")."""
    if not HAS_TRITON:
        return []
    kern, lora = op._kernels()
    seen = []

    def spy(module, name, label):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            seen.append(label + ("+ln_after" if kwargs.get("ln_after") is not None else ""))
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    spy(kern, "forward", "fused fwd")
    spy(kern, "backward", "fused bwd")
    spy(lora, "shrink", "shrink")
    spy(lora, "gemm", "gemm")
    return seen


def _make(M, d, m, *, act="relu", scaling=0.7, bias=True, x_shape=None, ln_before=False, ln_after=False,
          residual_before_ln=True, shift=0.0, frozen=()):
    """Inputs for fn(); scaling "learned" / "channel" / "scalar0d" draws a trainable tensor; `shift` offsets x
    (a large row mean for the layer norm); names in `frozen` get no gradient."""
    def make(dtype):
        g = torch.Generator().manual_seed(M * 17 + d + m)

        def rnd(*shape, std=1.0, mean=0.0):
            return (torch.randn(*shape, generator=g, dtype=torch.float64) * std + mean).to(DEVICE).to(dtype)

        shape = x_shape or (M, d)
        t = dict(x=rnd(*shape, mean=shift), residual=rnd(*shape), w_down=rnd(m, d, std=d ** -0.5),
                 b_down=rnd(m) if bias else None, w_up=rnd(d, m, std=m ** -0.5), b_up=rnd(d) if bias else None)
        if scaling == "learned":
            t["scaling"] = rnd(1, mean=1.0)
        elif scaling == "scalar0d":
            t["scaling"] = rnd(1, mean=1.0).reshape(())
        elif scaling == "channel":
            t["scaling"] = rnd(d, std=0.3, mean=1.0)
        if ln_before:
            t["ln_before_w"], t["ln_before_b"] = rnd(d, std=0.3, mean=1.0), rnd(d, std=0.5)
        if ln_after:
            t["ln_after_w"], t["ln_after_b"] = rnd(d, std=0.3, mean=1.0), rnd(d, std=0.5)
        t = {k: v.requires_grad_(k not in frozen) if v is not None else None for k, v in t.items()}
        t.setdefault("scaling", scaling)
        return {**t, "non_linearity": act, "adapter_residual_before_ln": residual_before_ln}
    return make


def fn(ln_before_w=None, ln_before_b=None, ln_after_w=None, ln_after_b=None, **kw):
    """fp.ops.bottleneck_adapter with the layer-norm pairs as separate tensors (so the harness sees each leaf)."""
    ln_before = (ln_before_w, ln_before_b) if ln_before_w is not None else None
    ln_after = (ln_after_w, ln_after_b) if ln_after_w is not None else None
    return fp.ops.bottleneck_adapter(ln_before=ln_before, ln_after=ln_after, **kw)


FUSED = ["fused fwd", "fused bwd"]


# ------------------------------------------------------------------------------------------------------------
# The fused kernels
# ------------------------------------------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_new", "swish", "tanh", "linear", "sigmoid", "leakyrelu"])
def test_fused_matches_reference_per_activation(act, dtype, launches):
    errors = check_op(fn, _make(37, 24, 5, act=act), dtype)
    assert set(errors) == {"output", "dx", "dresidual", "dw_down", "db_down", "dw_up", "db_up"}
    assert launches == FUSED


@needs_triton
@pytest.mark.parametrize("M, d, m, kw", [
    (1, 16, 1, {}), (70, 40, 3, {"bias": False}), (100, 24, 70, {"scaling": 4.0}),
    (10, 19, 4, {"x_shape": (2, 5, 19)}), (0, 24, 3, {}), (5, 24, BOTTLENECK_MAX_WIDTH, {"act": "gelu"}),
], ids=["M1_m1", "no_bias", "m70", "x3d_odd_d", "no_rows", "m256"])
def test_fused_odd_shapes(M, d, m, kw, launches):
    errors = check_op(fn, _make(M, d, m, **kw), torch.float32)
    assert "dx" in errors and "dw_up" in errors
    assert launches == (FUSED if M else [])  # no rows: the op body returns without a launch


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scaling", ["learned", "scalar0d", "channel"])
def test_fused_tensor_scaling(scaling, dtype, launches):
    errors = check_op(fn, _make(37, 24, 5, scaling=scaling, act="gelu"), dtype)
    assert "dscaling" in errors and launches == FUSED


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kw", [{}, {"shift": 4.0, "scaling": "channel", "bias": False}], ids=["plain", "mean4"])
def test_fused_layer_norm_before(kw, dtype, launches):
    errors = check_op(fn, _make(37, 24, 5, ln_before=True, act="swish", **kw), dtype)
    assert {"dx", "dln_before_w", "dln_before_b", "dw_down"} <= set(errors)
    assert launches == FUSED


FUSED_LN_AFTER = ["fused fwd+ln_after", "fused bwd+ln_after"]


@needs_triton
@pytest.mark.parametrize("kw", [{}, {"ln_before": True, "scaling": "channel", "act": "swish"}],
                         ids=["plain", "ln_before_channel"])
@pytest.mark.parametrize("residual_before_ln", [True, False], ids=["res_before_ln", "res_after_ln"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_layer_norm_after(dtype, residual_before_ln, kw, launches):
    make = _make(37, 24, 6, ln_after=True, residual_before_ln=residual_before_ln, **kw)
    errors = check_op(fn, make, dtype)
    assert {"output", "dx", "dresidual", "dw_down", "db_down", "dw_up", "db_up", "dln_after_w",
            "dln_after_b"} <= set(errors)
    assert launches == FUSED_LN_AFTER


@needs_triton
@pytest.mark.parametrize("M, d, m, kw", [
    (37, 19, 5, {"scaling": "learned", "bias": False}), (5, 40, 3, {"scaling": 2.0, "act": "gelu"}),
], ids=["learned_odd_d_no_bias", "M5_3_chunks"])
@pytest.mark.parametrize("residual_before_ln", [True, False], ids=["res_before_ln", "res_after_ln"])
def test_fused_layer_norm_after_shapes(M, d, m, kw, residual_before_ln, launches):
    errors = check_op(fn, _make(M, d, m, ln_after=True, residual_before_ln=residual_before_ln, **kw), torch.float32)
    assert {"dln_after_w", "dln_after_b", "dresidual", "dw_up"} <= set(errors)
    assert launches == FUSED_LN_AFTER


@needs_triton
@pytest.mark.parametrize("frozen", [("x", "w_down", "b_down", "w_up", "b_up", "ln_after_w", "ln_after_b"),
                                    ("residual", "ln_after_w", "ln_after_b"), ("x", "residual", "w_up", "b_up")],
                         ids=["residual_only", "no_ln_after_params", "no_up"])
def test_fused_layer_norm_after_partial_gradients(frozen, launches):
    make = _make(21, 24, 5, ln_after=True, scaling="channel", frozen=frozen)
    errors = check_op(fn, make, torch.float32)
    assert not {f"d{name}" for name in frozen} & set(errors)
    assert launches == FUSED_LN_AFTER


@needs_triton
@pytest.mark.parametrize("residual_before_ln", [True, False])
def test_no_grad_forward_with_layer_norm_after(residual_before_ln, launches):
    t = _make(21, 24, 5, ln_after=True, residual_before_ln=residual_before_ln)(torch.float32)
    with torch.no_grad(), fp.ops.use_backend("triton"), fp.ops.poison_outputs():
        y = fn(**t)
    assert rel_err(y, reference.bottleneck_adapter(**{k: v for k, v in t.items() if "ln_after" not in k},
                                                   ln_after=(t["ln_after_w"], t["ln_after_b"]))) < 1e-5
    assert launches == ["fused fwd+ln_after"]


@needs_triton
@pytest.mark.parametrize("frozen", [("x", "residual"), ("w_down", "b_down", "ln_before_b"), ("w_up", "b_up"),
                                    ("w_down", "b_down", "w_up", "b_up", "scaling", "ln_before_w", "ln_before_b")],
                         ids=["weights_only", "no_down", "no_up", "inputs_only"])
def test_fused_partial_gradients(frozen, launches):
    make = _make(19, 24, 5, ln_before=True, scaling="learned", act="tanh", frozen=frozen)
    errors = check_op(fn, make, torch.float32)
    assert not {f"d{name}" for name in frozen} & set(errors)
    assert launches == FUSED


@needs_triton
def test_no_grad_forward_skips_saving(launches):
    t = _make(21, 24, 5, ln_before=True)(torch.float32)
    with torch.no_grad(), fp.ops.use_backend("triton"), fp.ops.poison_outputs():
        y = fn(**t)
    with fp.ops.use_backend("torch"):
        want = fn(**t)
    assert rel_err(y, want) < 1e-5 and launches == ["fused fwd"]


# ------------------------------------------------------------------------------------------------------------
# Wide bottlenecks (the two-kernel path) and the reference routes
# ------------------------------------------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("act, kw", [("relu", {}), ("sigmoid", {"ln_after": True})], ids=["epilogue_act", "torch_act"])
def test_wide_bottleneck_two_kernel_path(act, kw, launches):
    errors = check_op(fn, _make(9, 20, BOTTLENECK_MAX_WIDTH + 4, act=act, **kw), torch.float32)
    assert "dw_down" in errors
    assert launches[:2] == ["shrink", "gemm"] and "fused fwd" not in launches


@needs_triton
@pytest.mark.parametrize("kw", [{"scaling": "channel"}, {"ln_before": True}])
def test_wide_bottleneck_with_options_runs_the_reference(kw, launches):
    check_op(fn, _make(5, 16, BOTTLENECK_MAX_WIDTH + 1, **kw), torch.float32)
    assert launches == []


@needs_triton
def test_dropout_runs_the_reference(launches):
    t = _make(6, 16, 3)(torch.float32)
    with fp.ops.use_backend("triton"):
        torch.manual_seed(5)
        y = fp.ops.bottleneck_adapter(**t, dropout=0.5)
        assert launches == []
        assert torch.equal(fp.ops.bottleneck_adapter(**t, dropout=0.0), fp.ops.bottleneck_adapter(**t))
        assert launches == ["fused fwd", "fused fwd"]
    torch.manual_seed(5)
    want = reference.bottleneck_adapter(**t, dropout=0.5)
    assert torch.equal(y, want)
    assert (y == t["residual"]).any(), "dropout 0.5 zeroes some of s · up"


def test_gating_runs_the_reference(launches):
    t = _make(6, 8, 2)(torch.float32)
    x, r = t.pop("x").reshape(2, 3, 8), t.pop("residual").reshape(2, 3, 8)
    t.pop("adapter_residual_before_ln")
    opts = dict(ln_before=(torch.rand(8) + 0.5, torch.randn(8)), ln_after=(torch.rand(8) + 0.5, torch.randn(8)),
                gate=(torch.randn(1, 8), torch.randn(1)), adapter_residual_before_ln=True)
    y = fp.ops.bottleneck_adapter(x, r, **t, **opts)
    assert torch.equal(y, reference.bottleneck_adapter(x, r, **t, **opts))
    assert not torch.allclose(y, fp.ops.bottleneck_adapter(x, r, **t))  # the options do change the result
    assert launches == []


@pytest.mark.parametrize("kw", [
    {"act": "gelu"}, {"act": "sigmoid", "ln_before": True, "scaling": "channel"},
    {"ln_after": True, "scaling": "learned"}, {"ln_after": True, "residual_before_ln": False, "ln_before": True},
], ids=["plain", "ln_channel", "ln_after_res_before", "ln_after_res_after"])
def test_compiled_op_body_matches_eager(kw):
    t = _make(9, 12, 3, **kw)(torch.float32)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    leaves = [k for k, v in t.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    y = compiled(**t)
    grads = torch.autograd.grad(y.sum(), [t[k] for k in leaves])
    t2 = {k: (v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
    with fp.ops.use_backend("torch"):
        y2 = fn(**t2)
    grads2 = torch.autograd.grad(y2.sum(), [t2[k] for k in leaves])
    assert rel_err(y, y2) < 1e-6
    for name, a, b in zip(leaves, grads, grads2):
        assert rel_err(a, b) < 1e-5, name


def test_every_kernel_activation_is_a_reference_activation():
    """The names the configs accept (config/_checks.py: config sits below the ops and cannot import their table),
    the reference computes and the kernels take are one set."""
    assert set(ACTIVATIONS) == set(reference.ACTIVATIONS) == set(fp.config.NON_LINEARITIES)
    assert all(fp.ops.activation(name) is reference.activation(name) for name in ACTIVATIONS)
    with pytest.raises(ValueError, match="non_linearity 'softsign' is not supported"):
        fp.ops.activation("softsign")


@needs_triton
def test_kernel_activation_codes_match_the_kernels():
    """One table of codes and limits (kernels/limits.py) for the op and the kernels, and one activation helper
    (kernels/_activation.py) for the fused kernels and the LoRA epilogue (kernels/lora_terms.py);
    tests/kernels/test_activation.py checks that each code computes its reference activation."""
    from fastpeft.kernels import lora_terms

    kern, _ = op._kernels()
    assert op.ACTIVATIONS is limits.ACTIVATIONS and op.BOTTLENECK_MAX_WIDTH == kern.BOTTLENECK_MAX_WIDTH
    assert kern.activation is lora_terms.activation


@pytest.mark.parametrize("change, match", [
    (dict(residual=torch.randn(4, 7)), "residual has shape"),
    (dict(w_up=torch.randn(8, 3)), "must be"),
    (dict(b_down=torch.randn(3)), "b_down has shape"),
    (dict(non_linearity="softsign"), "non_linearity"),
    (dict(scaling=torch.ones(3)), "scaling has shape"),
    (dict(dropout=1.0), "dropout"),
])
def test_bad_input(change, match):
    t = dict(x=torch.randn(4, 8), residual=torch.randn(4, 8), w_down=torch.randn(2, 8), b_down=torch.randn(2),
             w_up=torch.randn(8, 2), b_up=torch.randn(8))
    t.update(change)
    with pytest.raises(ValueError, match=match):
        fp.ops.bottleneck_adapter(**t)
