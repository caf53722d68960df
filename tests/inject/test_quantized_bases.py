"""Quantized base layers from the real libraries (bitsandbytes through transformers' BitsAndBytesConfig, torchao's
NF4 and int8 weights): until fastpeft has a rule for a kind, add_adapter refuses it, naming the layer and its
weight's type, and leaves the model exactly as it was (never the silent wrong output a tensor subclass used as a
dense weight gives)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fastpeft as fp

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore")


def _tiny_llama(dtype=torch.float32):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def _refused_unchanged(model, config, *, names: str, logits: bool = True):
    """add_adapter raises TargetError naming the layers and their weights' type; modules, every state tensor and
    (where the library's forward runs on these shapes) the logits unchanged."""
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        before = model(input_ids=ids).logits if logits else None
    modules = [(name, type(m)) for name, m in model.named_modules()]
    dense = (torch.Tensor, nn.Parameter)  # quantized subclasses are compared as the same objects (cloning an
    state = {k: v.detach().clone() if type(v) in dense else v  # NF4Tensor requantizes it)
             for k, v in model.state_dict(keep_vars=True).items()}
    with pytest.raises(fp.TargetError, match=names) as err:
        fp.add_adapter(model, "a", config)
    assert "cannot compute with yet" in str(err.value) and "Nothing was changed" in str(err.value)
    assert [(name, type(m)) for name, m in model.named_modules()] == modules
    after = model.state_dict(keep_vars=True)
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], v) if type(after[k]) in dense else after[k] is v for k, v in state.items())
    if logits:
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, before)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bitsandbytes_4bit_is_refused(tmp_path, quant_type):
    pytest.importorskip("bitsandbytes")
    _tiny_llama().save_pretrained(tmp_path)
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                                   bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=quantization).eval()
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    _refused_unchanged(model, fp.LoRAConfig(target_modules=["q_proj", "v_proj"]),
                       names=r"model\.layers\.0\.self_attn\.q_proj \(Linear4bit, weight Params4bit uint8\)",
                       logits=False)  # bitsandbytes 0.50's CPU 4-bit matmul fails on some tiny shapes


def test_torchao_nf4_weight_is_refused():
    """The case that changed the output silently before: an nn.Linear holding torchao's NF4Tensor."""
    nf4 = pytest.importorskip("torchao.quantization.quantize_.workflows.nf4.nf4_tensor")
    model = _tiny_llama(torch.bfloat16)
    for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.mlp.up_proj):
            proj.weight = nn.Parameter(nf4.to_nf4(proj.weight.detach(), 64, 32), requires_grad=False)
    for config in (fp.LoRAConfig(target_modules=["q_proj", "up_proj"]), fp.IA3Config(
            target_modules=["q_proj", "up_proj"], feedforward_modules=["up_proj"]),
            fp.LoRAConfig(target_modules="all-linear", use_dora=True)):
        _refused_unchanged(model, config, names=r"self_attn\.q_proj \(Linear, weight NF4Tensor bfloat16\)")


def test_torchao_int8_weight_only_is_refused():
    torchao = pytest.importorskip("torchao.quantization")
    model = _tiny_llama()
    torchao.quantize_(model.model.layers[0].self_attn, torchao.Int8WeightOnlyConfig())
    _refused_unchanged(model, fp.LoRAConfig(target_modules=["q_proj", "v_proj"]),
                       names=r"layers\.0\.self_attn\.q_proj \(Linear, weight Int8Tensor float32\)")
