"""PEFT `target_parameters` checkpoints (LoRA on fused expert tensors) both ways, with equal logits."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastpeft as fp
from fastpeft.errors import CheckpointError

from ..inject.moe_models import EXPERT_PARAMS, FAMILIES, ids, peft_model, rel, same_model, tiny_moe

pytest.importorskip("peft")


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_checkpoint_loads_with_peft_logits(family, tmp_path):
    base = tiny_moe(family)
    fast = same_model(base)
    peft = peft_model(base, r=2, lora_alpha=4, target_modules=["q_proj"])
    peft.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_parameters"]
    fp.load_adapter(fast, tmp_path, name="x")
    x = ids(1)
    assert rel(_logits(fast, x), _logits(peft, x)) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_fastpeft_checkpoint_loads_into_peft(family, tmp_path):
    from peft import PeftModel

    model = tiny_moe(family)
    base = same_model(model)
    fp.add_adapter(model, "a", fp.LoRAConfig(r=2, alpha=6, init_weights=False, target_parameters=EXPERT_PARAMS))
    fp.save_adapter(model, tmp_path, "a")
    keys = load_file(tmp_path / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0.mlp.experts."
    assert set(keys) == {prefix + k for k in ("lora_A.weight", "lora_B.weight", "base_layer.lora_A.weight",
                                              "base_layer.lora_B.weight")}
    peft = PeftModel.from_pretrained(base, tmp_path)
    x = ids(2)
    assert rel(_logits(peft, x), _logits(model, x)) < 1e-5


def test_one_tensor_rank_pattern_and_alpha_pattern_both_ways(tmp_path):
    from peft import PeftModel

    base = tiny_moe("mixtral", layers=2)
    fast, clean = same_model(base), same_model(base)
    peft = peft_model(base, r=2, lora_alpha=4, target_parameters=["mlp.experts.down_proj"],
                      rank_pattern={"layers.1.mlp.experts.down_proj": 5}, alpha_pattern={"down_proj": 3})
    peft.save_pretrained(tmp_path / "peft")
    fp.load_adapter(fast, tmp_path / "peft", name="x")
    layer = fast.model.layers[1].mlp.experts
    assert layer.r["x"] == {"down_proj": 5} and layer.scaling["x"]["down_proj"] == pytest.approx(3 / 5)
    x = ids(3)
    assert rel(_logits(fast, x), _logits(peft, x)) < 1e-5
    fp.save_adapter(fast, tmp_path / "fast", "x")
    keys = load_file(tmp_path / "fast" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.1.mlp.experts.lora_A.weight" in keys  # one tensor: no base_layer nesting
    again = PeftModel.from_pretrained(clean, tmp_path / "fast")
    assert rel(_logits(again, x), _logits(peft, x)) < 1e-5


def test_dropout_adapter_round_trips_in_fastpeft(tmp_path):
    model = tiny_moe("gpt_oss")
    fp.add_adapter(model, "a", fp.LoRAConfig(r=2, dropout=0.1, init_weights=False, target_parameters=EXPERT_PARAMS))
    fp.save_adapter(model, tmp_path, "a")
    other = same_model(tiny_moe("gpt_oss"))
    fp.load_adapter(other, tmp_path, name="a")
    x = ids(4)
    assert torch.equal(_logits(other, x), _logits(model, x))


def test_wrong_rank_in_checkpoint_is_refused_and_changes_nothing(tmp_path):
    base = tiny_moe("qwen3_moe")
    peft = peft_model(base, r=2)
    peft.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["r"] = 3
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    fast = tiny_moe("qwen3_moe")
    before = list(fast.state_dict())
    with pytest.raises(CheckpointError, match="r·num_experts"):
        fp.load_adapter(fast, tmp_path, name="x")
    assert list(fast.state_dict()) == before and not fp.adapters(fast)


def test_missing_expert_tensor_is_refused(tmp_path):
    base = tiny_moe("mixtral")
    peft_model(base, r=2).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors = {k: v for k, v in tensors.items() if ".base_layer." not in k}
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="lacks 2 tensor"):
        fp.load_adapter(tiny_moe("mixtral"), tmp_path, name="x")
