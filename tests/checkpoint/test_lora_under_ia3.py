"""Loading a LoRA checkpoint onto layers an IA3 adapter already wraps (the IA3 layer then wraps the LoRA layer).

Regression: fp.load_adapter used to look for lora_A on the outer IA3 layer and fail with AttributeError. The
loaded model must compute what the same two adapters added with fp.add_adapter compute, in either order.
"""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

import fastpeft as fp
from fastpeft.errors import CheckpointError
from fastpeft.modules import IA3Linear, LoRALinear

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore")


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


def _ids():
    return torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_checkpoint_loads_under_ia3(tmp_path, use_dora):
    base = _llama()
    lora_cfg = fp.LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False, use_dora=use_dora)
    source = fp.add_adapter(copy.deepcopy(base), "lo", lora_cfg)
    fp.save_adapter(source, tmp_path, "lo")

    model = fp.add_adapter(copy.deepcopy(base), "ia", fp.IA3Config(target_modules=["v_proj"],
                                                                  feedforward_modules=[], init_weights=False))
    fp.load_adapter(model, tmp_path, name="lo")
    v = model.model.layers[0].self_attn.v_proj
    assert isinstance(v, IA3Linear) and isinstance(v.base_layer, LoRALinear)

    expected = fp.add_adapter(copy.deepcopy(source), "ia", fp.IA3Config(target_modules=["v_proj"],
                                                                         feedforward_modules=[]))
    for path, module in model.named_modules():  # the same IA3 vectors as the loaded model's
        if isinstance(module, IA3Linear):
            expected.get_submodule(path).ia3_l["ia"].data.copy_(module.ia3_l["ia"])
    for m in (model, expected):
        fp.set_active_adapters(m, ["lo", "ia"])
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()).logits, expected(_ids()).logits, rtol=1e-5, atol=1e-6)
        fp.set_active_adapters(model, "lo")
        fp.set_active_adapters(source, "lo")
        torch.testing.assert_close(model(_ids()).logits, source(_ids()).logits, rtol=1e-5, atol=1e-6)

    fp.save_adapter(model, tmp_path / "again", "lo")  # and it saves back the same tensors
    reloaded = fp.load_adapter(copy.deepcopy(base), tmp_path / "again", name="lo")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(_ids()).logits, source(_ids()).logits, rtol=1e-5, atol=1e-6)


def test_bad_lora_checkpoint_under_ia3_changes_nothing(tmp_path):
    base = _llama()
    source = fp.add_adapter(copy.deepcopy(base), "lo", fp.LoRAConfig(r=4, target_modules=["v_proj"]))
    fp.save_adapter(source, tmp_path, "lo")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["r"] = 5  # disagrees with the tensors
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))

    model = fp.add_adapter(copy.deepcopy(base), "ia", fp.IA3Config(target_modules=["v_proj"], feedforward_modules=[]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="r"):
        fp.load_adapter(model, tmp_path, name="lo")
    v = model.model.layers[0].self_attn.v_proj
    assert isinstance(v, IA3Linear) and not isinstance(v.base_layer, LoRALinear)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert os.path.isdir(tmp_path)
