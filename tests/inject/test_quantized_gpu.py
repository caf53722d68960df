"""GPU tier: adapters on quantized bases where only CUDA runs them (skipped without a CUDA device).

- bitsandbytes NF4 on CUDA: LoRA layers run fp.ops.lora_linear_4bit (the fused 4-bit kernel and the
  dequantize-then-cuBLAS strategy); logits and adapter gradients equal the library's own path (bitsandbytes'
  forward plus the term, what `use_backend("torch")` runs) within bf16 tolerance, and the fused strategy never
  calls bitsandbytes' dequantization.
- torchao int4 weight-only (its CUDA tile-packed layout; torchao runs no int4 kernel on this project's CPU): fresh
  LoRA adapters leave the logits bit for bit unchanged; a random one gives F.linear on torchao's dequantized W plus
  the term; a few SGD steps lower the loss.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import fastpeft as fp
from fastpeft.modules import base_layers
from tests.harness import rel_err, sgd_losses
from tests.quantized import load_4bit

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore")]
transformers = pytest.importorskip("transformers")

IDS = torch.tensor([[1, 5, 9, 2, 7, 4, 4, 8] * 4, [3, 3, 8, 1, 4, 2, 6, 9] * 4])  # 2 x 32 tokens: M = 64
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _folder(tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("how", ["fused", "cublas"])
def test_lora_on_nf4_runs_the_4bit_op_and_equals_the_library_path(how, tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    model = load_4bit(_folder(tmp_path), compute_dtype=torch.bfloat16, double_quant=True, device_map={"": 0}).train()
    fp.add_adapter(model, "a", fp.LoRAConfig(r=16, alpha=32, target_modules=TARGETS))
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.05)
    ids = IDS.cuda()
    dequantized = []

    def counting(data, state):
        weight = base_layers.packed_4bit(data, state)
        return dataclasses.replace(weight, dequantize=lambda: dequantized.append(1) or weight.dequantize())

    monkeypatch.setattr("fastpeft.modules.lora.packed_4bit", counting)
    runs = {}
    for label, backend in (("library", "torch"), ("kernel", None)):
        model.zero_grad()
        with fp.ops.use_backend(backend), fp.ops.use_kernel_options(linear_strategy=how):
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
        runs[label] = (out.logits.float(), layer.lora_B["a"].grad.float().clone())
    assert rel_err(runs["kernel"][0], runs["library"][0]) < 2e-2
    assert rel_err(runs["kernel"][1], runs["library"][1]) < 5e-2
    assert (len(dequantized) == 0) == (how == "fused")


def test_lora_on_torchao_int4(tmp_path):
    quantization = pytest.importorskip("torchao.quantization")
    model = transformers.LlamaForCausalLM.from_pretrained(_folder(tmp_path)).to("cuda", torch.bfloat16)
    try:
        quantization.quantize_(model.model.layers, quantization.Int4WeightOnlyConfig(
            group_size=32, int4_packing_format="tile_packed_to_4d"))
    except (ImportError, NotImplementedError, AssertionError) as err:
        pytest.skip(f"torchao int4 weight-only does not run here: {err}")
    ids = IDS.cuda()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    fp.add_adapter(model, "a", fp.LoRAConfig(r=8, alpha=16, target_modules=TARGETS))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.quantized == "torchao"
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
        layer.lora_B["a"].normal_(0.0, 0.05)
        x = torch.randn(5, layer.in_features, device="cuda", dtype=torch.bfloat16)
        w = base_layers.dequantized_weight(layer.base_layer).float()
        term = (x.float() @ layer.lora_A["a"].t() @ layer.lora_B["a"].t()) * layer.scaling["a"]
        expected = x.float() @ w.t() + term
        assert rel_err(layer(x).float(), expected) < 2e-2
    losses = sgd_losses(model.train(), ids)
    assert losses[-1] < losses[0]
