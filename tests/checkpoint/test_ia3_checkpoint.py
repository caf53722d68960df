"""IA3 checkpoints in PEFT's format: PEFT -> fastpeft and fastpeft -> PEFT with matching outputs on every family,
bit-identical round trips, and checkpoints that do not fit refused with the model unchanged."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastpeft as fp
from fastpeft.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from fastpeft.modules import IA3Linear

peft = pytest.importorskip("peft")
from tests.inject.test_errors import unchanged  # noqa: E402
from tests.models.tiny import BUILDERS, IDS, model, out  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
FAMILIES = list(BUILDERS)


def _out(m):
    """Logits of a fastpeft model or a PeftModel (whose seq2seq wrapper wants the base model called)."""
    if isinstance(m, peft.PeftModel):
        m = m.get_base_model()
    return out(m)


@pytest.mark.parametrize("kind", FAMILIES)
def test_peft_checkpoint_loads_into_fastpeft(kind, tmp_path):
    torch.manual_seed(0)
    pm = peft.get_peft_model(model(kind), peft.IA3Config(init_ia3_weights=False)).eval()
    pm.save_pretrained(tmp_path)
    m = model(kind)
    fp.load_adapter(m, tmp_path, name="x")
    assert fp.adapters(m)["x"].method == "ia3"
    torch.testing.assert_close(out(m), _out(pm), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", FAMILIES)
def test_fastpeft_checkpoint_loads_into_peft(kind, tmp_path):
    m = model(kind)
    fp.add_adapter(m, "a", fp.IA3Config(init_weights=False))
    fp.save_adapter(m, tmp_path, "a")
    pm = peft.PeftModel.from_pretrained(model(kind), tmp_path).eval()
    torch.testing.assert_close(_out(pm), out(m), atol=1e-6, rtol=1e-6)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "IA3" and set(cfg["feedforward_modules"]) <= set(cfg["target_modules"])


def test_round_trip_is_bit_identical_with_modules_to_save(tmp_path):
    m = model("gpt2")
    fp.add_adapter(m, "a", fp.IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                                        init_weights=False, modules_to_save=["ln_f"]))
    with torch.no_grad():
        m.transformer.ln_f.modules_to_save["a"].weight.add_(0.5)
    fp.save_adapter(m, tmp_path, "a")
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    assert tensors["base_model.model.transformer.h.0.mlp.c_proj.ia3_l"].shape == (1, 128)
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.ia3_l"].shape == (96, 1)
    m2 = model("gpt2")
    fp.load_adapter(m2, tmp_path, name="a")
    assert torch.equal(out(m2), out(m))
    for (n1, p1), (n2, p2) in zip(m.named_parameters(), m2.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)


def _saved(tmp_path, kind="llama"):
    m = model(kind)
    fp.add_adapter(m, "a", fp.IA3Config(init_weights=False))
    fp.save_adapter(m, tmp_path, "a")
    return tmp_path


def _edit_tensors(path, fn):
    tensors = load_file(str(path / WEIGHTS_NAME))
    fn(tensors)
    save_file(tensors, str(path / WEIGHTS_NAME))


KEY = "base_model.model.model.layers.0.mlp.down_proj.ia3_l"


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.update({KEY: t[KEY].t().contiguous()}), "has shape"),
    (lambda t: t.pop(KEY), "lacks 1 tensor"),
    (lambda t: t.update({"base_model.model.model.layers.0.mlp.up_proj.ia3_l": t[KEY].clone()}), "match no module"),
])
def test_tensors_that_do_not_fit(tmp_path, edit, match):
    path = _saved(tmp_path)
    _edit_tensors(path, edit)
    m = model()
    with unchanged(m), pytest.raises(fp.CheckpointError, match=match):
        fp.load_adapter(m, path)


@pytest.mark.parametrize("change, match", [
    (dict(feedforward_modules=[]), "has shape"),  # a vector saved for the input read as one for the output
    (dict(target_modules=["query", "value"], feedforward_modules=[]), "does not fit"),
    (dict(some_new_option=True), "some_new_option"),
])
def test_configs_that_do_not_fit(tmp_path, change, match):
    path = _saved(tmp_path)
    cfg = json.loads((path / CONFIG_NAME).read_text())
    cfg.update(change)
    (path / CONFIG_NAME).write_text(json.dumps(cfg))
    m = model()
    with unchanged(m), pytest.raises(fp.CheckpointError, match=match):
        fp.load_adapter(m, path)


def test_llama_adapter_into_gpt2(tmp_path):
    m = model("gpt2")
    with unchanged(m), pytest.raises(fp.CheckpointError, match="another base model"):
        fp.load_adapter(m, _saved(tmp_path))


def test_loaded_adapter_trains_and_merges(tmp_path):
    m = model()
    fp.load_adapter(m, _saved(tmp_path))
    assert all(p.requires_grad for n, p in m.named_parameters() if ".ia3_l." in n)
    logits = out(m)
    fp.merge_adapter(m, "default")
    torch.testing.assert_close(out(m), logits, atol=1e-5, rtol=1e-5)
    assert all(x.merged_adapters == ["default"] for x in m.modules() if isinstance(x, IA3Linear))
    assert IDS.shape[0] == 2
