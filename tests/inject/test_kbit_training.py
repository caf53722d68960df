"""`fp.prepare_for_kbit_training` and the QLoRA recipe of PEFT's docs with fp.add_adapter in place of
get_peft_model: a bitsandbytes 4-bit Llama loaded in bfloat16, prepared (dtypes, frozen parameters and gradient
checkpointing as PEFT's prepare_model_for_kbit_training leaves them), then trained by a real transformers.Trainer
with gradient checkpointing: the same losses as PEFT's run from the same adapter weights."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fastpeft as fp
from tests.quantized import load_4bit

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


def _load_4bit(folder):
    return load_4bit(folder, compute_dtype=torch.bfloat16, double_quant=True, dtype=torch.bfloat16)


def _layout(model):
    return {n: (p.dtype, p.requires_grad, type(p).__name__) for n, p in model.named_parameters()}


def test_prepares_the_model_as_peft_does(checkpoint):
    ours, theirs = _load_4bit(checkpoint), _load_4bit(checkpoint)
    assert ours.model.norm.weight.dtype == torch.bfloat16
    assert fp.prepare_for_kbit_training(ours) is ours
    peft.prepare_model_for_kbit_training(theirs)
    assert _layout(ours) == _layout(theirs)
    assert ours.model.norm.weight.dtype == torch.float32 and not any(p.requires_grad for p in ours.parameters())
    assert ours.model.layers[0].self_attn.q_proj.weight.dtype == torch.uint8  # quantized storage untouched
    assert ours.is_gradient_checkpointing and theirs.is_gradient_checkpointing
    assert ours.get_input_embeddings()(torch.tensor([[1, 2]])).requires_grad  # reentrant checkpointing needs it


def test_qlora_trainer_recipe_matches_peft(checkpoint, tmp_path):
    """PEFT's adapter weights copied in (fp.load_adapter), then three Trainer steps each with gradient
    checkpointing: equal losses, and the adapters (only they) trained."""
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                           task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(peft.prepare_model_for_kbit_training(_load_4bit(checkpoint)), lora)
    theirs.save_pretrained(tmp_path / "init")
    ours = fp.load_adapter(fp.prepare_for_kbit_training(_load_4bit(checkpoint)), tmp_path / "init", name="default")
    start = {n: p.detach().clone() for n, p in ours.named_parameters() if p.requires_grad}
    assert start and all("lora_" in n for n in start)

    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(1, 100, (8, 12), generator=g).tolist()]
    losses = {}
    for label, model in (("peft", theirs), ("fastpeft", ours)):
        args = transformers.TrainingArguments(output_dir=str(tmp_path / label), max_steps=3,
                                              per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
                                              gradient_checkpointing=True, report_to=[], use_cpu=True, seed=0,
                                              save_strategy="no", lr_scheduler_type="constant")
        trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
        trainer.train()
        losses[label] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses["fastpeft"]) == 3 and losses["fastpeft"] == pytest.approx(losses["peft"], rel=1e-3)
    moved = {n: not torch.equal(p, start[n]) for n, p in ours.named_parameters() if n in start}
    assert all(moved.values()) and not any(p.requires_grad for n, p in ours.named_parameters() if n not in start)


def test_refusals_leave_the_model_unchanged(checkpoint):
    model = _load_4bit(checkpoint)
    assert model._hf_peft_config_loaded is False
    fp.add_adapter(model, "a", fp.LoRAConfig(target_modules=["q_proj"]))
    assert model._hf_peft_config_loaded is True  # what the Trainer looks for on a quantized model
    with pytest.raises(fp.AdapterError, match=r"already has adapters \['a'\].*before fp.add_adapter"):
        fp.prepare_for_kbit_training(model)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    fp.unload(model)
    assert model._hf_peft_config_loaded is False  # removed with the last adapter

    bare = nn.Sequential(_load_4bit(checkpoint).model.layers[0].self_attn.q_proj, nn.LayerNorm(64)).to(torch.bfloat16)
    with pytest.raises(fp.AdapterError, match="has no gradient_checkpointing_enable.*Nothing was changed"):
        fp.prepare_for_kbit_training(bare)
    assert bare[1].weight.dtype == torch.bfloat16 and bare[1].weight.requires_grad
    fp.prepare_for_kbit_training(bare, use_gradient_checkpointing=False)
    assert bare[1].weight.dtype == torch.float32 and not bare[1].weight.requires_grad
