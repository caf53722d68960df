"""AdaLoRA (fp.AdaLoRAConfig + fp.RankAllocator) on tiny random models: identity at init, the rank budget falling
to target_r while the loss falls, the same pruning decisions and losses as PEFT's AdaLoRA step for step, the
orthogonal regularisation in the loss, merge/unmerge, PEFT checkpoints both ways, and bad input."""
from __future__ import annotations

import pytest
import torch

import fastpeft as fp
from fastpeft.modules import LoRALinear

peft = pytest.importorskip("peft")
from tests.harness import rel_err  # noqa: E402
from tests.inject.test_errors import unchanged  # noqa: E402
from tests.models.test_lora_models import HEADS  # noqa: E402
from tests.models.tiny import assert_same_state, batch, model, out, snapshot  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
KINDS = ["llama", "gpt2", "bert", "t5"]
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"], "bert": ["query", "value"],
           "t5": ["q", "v", "wo"]}


def _config(kind, **kw):
    return dict(init_r=6, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=16, target_modules=TARGETS[kind], **kw)


def _ranks(m, name="a"):
    return [int((x.lora_E[name] != 0).sum()) for x in m.modules() if isinstance(x, LoRALinear) and name in x.lora_E]


@pytest.mark.parametrize("kind", KINDS)
def test_identity_at_init(kind):
    m = model(kind)
    before = out(m)
    fp.add_adapter(m, "a", fp.AdaLoRAConfig(**_config(kind)))
    assert torch.equal(out(m), before)
    names = {n.rsplit(".", 1)[0].rsplit(".", 1)[-1] for n, p in m.named_parameters() if p.requires_grad}
    assert names == {"lora_A", "lora_B", "lora_E"}


@pytest.mark.parametrize("kind", KINDS)
def test_budget_falls_to_target_while_the_loss_falls(kind):
    m = model(kind)
    frozen = snapshot(m)
    fp.add_adapter(m, "a", fp.AdaLoRAConfig(**_config(kind, orth_reg_weight=0.1,
                                                      modules_to_save=[HEADS.get(kind, "lm_head")])))
    allocator = fp.RankAllocator(m, "a")
    n_layers = len(_ranks(m))
    assert allocator.init_budget == 6 * n_layers and allocator.target_budget == 2 * n_layers
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-2)
    inputs, losses, budgets = batch(m), [], []
    for step in range(16):
        loss = m(**inputs).loss
        loss.backward()
        opt.step()
        budgets.append(allocator.update_and_allocate(m, step))
        opt.zero_grad()
        losses.append(loss.item())
    assert budgets[0] == allocator.init_budget and budgets[-1] == allocator.target_budget
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))
    assert sum(_ranks(m)) == allocator.target_budget
    assert losses[-1] < 0.5 * losses[0], losses
    pattern = fp.adapters(m)["a"].rank_pattern
    assert sum(sum(v) for v in pattern.values()) == allocator.target_budget
    fp.unload(m)
    assert_same_state(m, frozen)


def _copy_from_peft(m, pm, name="a"):
    with torch.no_grad():
        for n, x in pm.named_modules():
            if hasattr(x, "lora_E") and "default" in x.lora_E:
                layer = m.get_submodule(n.replace("base_model.model.", "", 1))
                layer.lora_A[name].copy_(x.lora_A["default"])
                layer.lora_B[name].copy_(x.lora_B["default"])
                layer.lora_E[name].copy_(x.lora_E["default"].flatten())


def test_same_pruning_and_losses_as_peft_step_for_step():
    """Same initial weights, same data, SGD in float64: every loss and every rank pattern agree with PEFT's."""
    kw = _config("llama")
    torch.manual_seed(3)
    pm = peft.get_peft_model(model("llama").double(), peft.AdaLoraConfig(task_type="CAUSAL_LM", **kw))
    m = model("llama").double()
    fp.add_adapter(m, "a", fp.AdaLoRAConfig(**kw))
    _copy_from_peft(m, pm)
    allocator = fp.RankAllocator(m, "a")
    opts = [torch.optim.SGD([p for p in x.parameters() if p.requires_grad], lr=0.5) for x in (pm, m)]
    inputs = batch(m)
    for step in range(16):
        losses = []
        for x, opt in zip((pm, m), opts):
            loss = x(**inputs).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
        pm.base_model.update_and_allocate(step)
        allocator.update_and_allocate(m, step)
        for opt in opts:
            opt.zero_grad()
        assert losses[1] == pytest.approx(losses[0], rel=1e-6), step  # PEFT keeps ranknum in float32
        theirs = {k.replace(".default", ""): v for k, v in (pm.peft_config["default"].rank_pattern or {}).items()}
        assert (fp.adapters(m)["a"].rank_pattern or {}) == theirs, step


def test_orth_regularization_is_added_to_the_loss():
    m = model()
    fp.add_adapter(m, "a", fp.AdaLoRAConfig(**_config("llama", orth_reg_weight=0.5)))
    inputs = batch(m)
    with_reg = m(**inputs).loss
    fp.set_active_adapters(m, None)  # inactive: no penalty (its update is zero at init anyway)
    plain = m(**inputs).loss
    terms = [torch.linalg.matrix_norm(t - torch.eye(t.shape[0])) for x in m.modules() if isinstance(x, LoRALinear)
             for t in (x.lora_A["a"] @ x.lora_A["a"].t(), x.lora_B["a"].t() @ x.lora_B["a"])]
    assert with_reg.item() == pytest.approx(plain.item() + 0.5 * torch.stack(terms).mean().item(), rel=1e-6)
    fp.delete_adapter(m, "a")
    assert m(**inputs).loss.item() == pytest.approx(plain.item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_unmerge(kind, dtype):
    m = model(kind).to(dtype)
    fp.add_adapter(m, "a", fp.AdaLoRAConfig(**_config(kind, init_weights=False)))
    before, logits = snapshot(m), out(m)
    assert rel_err(logits, out(model(kind).to(dtype))) > 1e-4
    fp.merge_adapter(m, "a")
    assert rel_err(out(m), logits) < (1e-5 if dtype == torch.float32 else 2e-2)
    fp.unmerge_adapter(m)
    assert_same_state(m, before)


def _out(m):
    return out(m.get_base_model() if isinstance(m, peft.PeftModel) else m)


@pytest.mark.parametrize("kind", KINDS)
def test_peft_checkpoint_both_ways_with_a_rank_pattern(kind, tmp_path):
    torch.manual_seed(0)
    pm = peft.get_peft_model(model(kind), peft.AdaLoraConfig(**_config(kind)))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-2)
    inputs = batch(pm.get_base_model())
    for step in range(6):  # a few steps: trained values and a rank pattern that prunes
        pm(**inputs).loss.backward()
        opt.step()
        pm.base_model.update_and_allocate(step)
        opt.zero_grad()
    pm.save_pretrained(tmp_path / "peft")  # only the kept ranks (in memory, pruned E may have regrown since)
    reloaded = peft.PeftModel.from_pretrained(model(kind), tmp_path / "peft").eval()
    m = model(kind)
    fp.load_adapter(m, tmp_path / "peft")
    assert rel_err(out(m), _out(reloaded)) < 1e-6 and rel_err(out(m), out(model(kind))) > 1e-4
    assert sum(_ranks(m, "default")) < 6 * len(_ranks(m, "default"))
    fp.save_adapter(m, tmp_path / "fp")
    back = peft.PeftModel.from_pretrained(model(kind), tmp_path / "fp").eval()
    assert rel_err(_out(back), out(m)) < 1e-6


@pytest.mark.parametrize("kwargs, match", [
    (dict(init_r=4, target_r=8, total_step=10), "target_r"),
    (dict(total_step=None), "total_step"),
    (dict(total_step=10, tinit=8, tfinal=2), "tinit"),
    (dict(total_step=10, beta1=1.0), "beta1"),
    (dict(total_step=10, orth_reg_weight=-1), "orth_reg_weight"),
    (dict(total_step=10, deltaT=0), "deltaT"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(fp.ConfigError, match=match):
        fp.AdaLoRAConfig(**kwargs)


def test_allocator_errors_leave_the_model_unchanged():
    m = model()
    fp.add_adapter(m, "lora", fp.LoRAConfig(target_modules=["k_proj"]))
    with unchanged(m), pytest.raises(fp.ConfigError, match="AdaLoRA"):
        fp.RankAllocator(m, "lora")
    fp.add_adapter(m, "a", fp.AdaLoRAConfig(**_config("llama")))
    fp.set_active_adapters(m, "a")
    allocator = fp.RankAllocator(m, "a")
    with unchanged(m), pytest.raises(fp.AdapterError, match="after loss.backward"):
        allocator.update_and_allocate(m, 0)
