"""Quantized base layers from the real libraries: bitsandbytes 4-bit (NF4/FP4, with and without double
quantization) and 8-bit through transformers' BitsAndBytesConfig, torchao's NF4 and int8 weight-only weights.

LoRA, rsLoRA, DoRA and IA3 run on them through the layer's own forward: freshly initialised adapters leave the logits
bit for bit unchanged; a PEFT checkpoint trained on the same quantized base loads with PEFT's logits, and a fastpeft
one loads into PEFT the same way; training steps give PEFT's losses; a multi-adapter batch gives PEFT's mixed-batch
logits. What fastpeft cannot do there (AdaLoRA, merging, a tensor subclass it has no rule for) is refused with the
layer and its weight's type named, the model left exactly as it was: never the silent wrong output of a quantized
weight used as a dense one.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fastpeft as fp
from tests.harness import rel_err, sgd_losses

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore")

IDS = torch.tensor([[1, 5, 9, 2, 7], [3, 3, 8, 1, 4]])
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _tiny_llama(dtype=torch.float32):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def _bnb(kind: str):
    def build(folder):
        pytest.importorskip("bitsandbytes")
        if not (folder / "config.json").exists():
            _tiny_llama().save_pretrained(folder)
        if kind == "8bit":
            quantization = transformers.BitsAndBytesConfig(load_in_8bit=True)
        else:
            quant_type, double = kind.split("-")
            quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                                           bnb_4bit_use_double_quant=double == "double",
                                                           bnb_4bit_compute_dtype=torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return transformers.LlamaForCausalLM.from_pretrained(folder, quantization_config=quantization).eval()
    return build


def _torchao_nf4(folder):
    nf4 = pytest.importorskip("torchao.quantization.quantize_.workflows.nf4.nf4_tensor")
    model = _tiny_llama(torch.bfloat16)
    for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.v_proj, layer.mlp.down_proj):
            proj.weight = nn.Parameter(nf4.to_nf4(proj.weight.detach(), 64, 32), requires_grad=False)
    return model


def _torchao_int8(folder):
    torchao = pytest.importorskip("torchao.quantization")
    model = _tiny_llama()
    torchao.quantize_(model.model.layers, torchao.Int8WeightOnlyConfig())
    return model


BASES = {"bnb nf4": _bnb("nf4-single"), "bnb nf4 double-quant": _bnb("nf4-double"), "bnb fp4": _bnb("fp4-single"),
         "bnb 8-bit": _bnb("8bit"), "torchao nf4": _torchao_nf4, "torchao int8": _torchao_int8}
KINDS = {"bnb nf4": "bnb_4bit", "bnb nf4 double-quant": "bnb_4bit", "bnb fp4": "bnb_4bit", "bnb 8-bit": "bnb_8bit",
         "torchao nf4": "torchao", "torchao int8": "torchao"}
TOL = {"torchao nf4": 1e-2}  # a bf16 model: PEFT and fastpeft round the same float32 term to bf16


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


FEEDFORWARD = ["down_proj"]
METHODS = {  # method -> (fastpeft's config, PEFT's config with random initial weights)
    "lora": (lambda: fp.LoRAConfig(r=8, alpha=16, target_modules=TARGETS, use_rslora=True),
             lambda: peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False)),
    "dora": (lambda: fp.LoRAConfig(r=8, alpha=16, target_modules=TARGETS, use_dora=True),
             lambda: peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, use_dora=True,
                                     init_lora_weights=False)),
    "ia3": (lambda: fp.IA3Config(target_modules=TARGETS, feedforward_modules=FEEDFORWARD),
            lambda: peft.IA3Config(target_modules=TARGETS, feedforward_modules=FEEDFORWARD, init_ia3_weights=False)),
}
GRID = [pytest.param(base, method, id=f"{base}-{method}") for base in BASES for method in METHODS]


@pytest.mark.parametrize("base,method", GRID)
def test_fresh_adapters_are_the_identity(base, method, tmp_path):
    model = BASES[base](tmp_path)
    before = _logits(model)
    fp.add_adapter(model, "a", METHODS[method][0]())
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.quantized == KINDS[base]
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
    assert torch.equal(_logits(model), before)


PEFT_FAILS = {  # PEFT 0.21's own DoRA fails on these bases, so there is nothing to compare with
    ("bnb 8-bit", "dora"): "dequantizing moves the Int8Params to its device again, which drops its scales (SCB) on "
                           "the CPU: the next bitsandbytes matmul raises",
    ("torchao nf4", "dora"): "it calls weight.dequantize(), which NF4Tensor does not take without arguments",
}
PEFT_GRID = [pytest.param(base, method, id=f"{base}-{method}", marks=pytest.mark.skip(reason=PEFT_FAILS[base, method])
                          if (base, method) in PEFT_FAILS else ()) for base in BASES for method in METHODS]


@pytest.mark.parametrize("base,method", PEFT_GRID)
def test_checkpoints_move_both_ways_with_peft_and_train_alike(base, method, tmp_path):
    """PEFT's adapter (random weights) on its copy of the base -> fastpeft: PEFT's logits; fastpeft's saved adapter
    back into a fresh PEFT model: the same; then three SGD steps on each give the same losses."""
    theirs = peft.get_peft_model(BASES[base](tmp_path), METHODS[method][1]())
    theirs.save_pretrained(tmp_path / "peft")
    ours = fp.load_adapter(BASES[base](tmp_path), tmp_path / "peft", name="a")
    tol = TOL.get(base, 1e-5)
    assert rel_err(_logits(ours), _logits(theirs)) < tol
    fp.save_adapter(ours, tmp_path / "ours", name="a")
    back = peft.PeftModel.from_pretrained(BASES[base](tmp_path), tmp_path / "ours")
    assert rel_err(_logits(back), _logits(ours)) < tol

    losses = {}
    for label, model in (("peft", theirs), ("fastpeft", ours)):
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert trainable and all(p.dtype == torch.float32 for p in trainable)
        losses[label] = sgd_losses(model, IDS, lr=0.05)
    assert losses["fastpeft"] == pytest.approx(losses["peft"], rel=max(tol, 1e-5))


def _tensors(model) -> dict:
    """Every parameter and buffer by name: the object, and a copy of a dense one's values."""
    dense = (torch.Tensor, nn.Parameter)  # quantized tensors: the same objects (cloning an NF4Tensor requantizes it)
    return {name: (t, t.detach().clone() if type(t) in dense else None)
            for name, t in [*model.named_parameters(), *model.named_buffers()]}


def _refused_unchanged(model, call, error, *, match: str, logits: bool = True):
    """`call(model)` raises `error` matching `match`; the logits, the modules and every parameter and buffer (the
    same objects, dense ones with the same values) unchanged."""
    tensors = _tensors(model)
    modules = [(name, type(m)) for name, m in model.named_modules()]
    before = _logits(model) if logits else None
    with pytest.raises(error, match=match):
        call(model)
    if logits:
        assert torch.equal(_logits(model), before)
    assert [(name, type(m)) for name, m in model.named_modules()] == modules
    after = _tensors(model)
    assert after.keys() == tensors.keys()
    assert all(after[k][0] is t and (copy is None or torch.equal(t, copy)) for k, (t, copy) in tensors.items())


@pytest.mark.parametrize("base", ["bnb nf4", "torchao nf4"])
def test_adalora_is_refused(base, tmp_path):
    model = BASES[base](tmp_path)
    config = fp.AdaLoRAConfig(target_modules=["q_proj", "v_proj"], total_step=10)
    _refused_unchanged(model, lambda m: fp.add_adapter(m, "a", config), fp.TargetError,
                       match=r"self_attn\.q_proj \((Linear4bit, weight Params4bit uint8|Linear, weight NF4Tensor "
                             r"bfloat16)\).*: linear layers fastpeft cannot compute with yet.*LoRA, rsLoRA, DoRA and "
                             r"IA3 adapters run on bitsandbytes")


@pytest.mark.parametrize("base,method", [("bnb nf4", "lora"), ("torchao int8", "lora"), ("bnb 8-bit", "ia3")])
def test_merging_is_refused(base, method, tmp_path):
    model = BASES[base](tmp_path)
    fp.add_adapter(model, "a", METHODS[method][0]())
    _refused_unchanged(model, lambda m: fp.merge_adapter(m, "a"), fp.AdapterError,
                       match=r"merging into a quantized base \((bnb_4bit|bnb_8bit|torchao)\) is not supported")


ROWS = torch.tensor([[1, 5, 9, 2, 7], [3, 3, 8, 1, 4], [6, 2, 2, 9, 5], [4, 8, 1, 1, 3]])
NAMES = ["default", "__base__", "other", "default"]


@pytest.mark.parametrize("base", ["bnb nf4 double-quant", "bnb 8-bit", "torchao nf4"])
def test_a_lora_multi_adapter_batch_is_peft_mixed_batch(base, tmp_path):
    """Two PEFT adapters trained on the quantized base, loaded into fastpeft; one batch, one adapter (or none) per
    row: PEFT's mixed-batch logits."""
    theirs = peft.get_peft_model(BASES[base](tmp_path), METHODS["lora"][1]())
    theirs.add_adapter("other", METHODS["lora"][1]())
    theirs.save_pretrained(tmp_path / "peft")
    ours = fp.load_adapter(BASES[base](tmp_path), tmp_path / "peft", name="default")
    fp.load_adapter(ours, tmp_path / "peft" / "other", name="other")
    theirs.eval()
    with torch.no_grad():
        want = theirs(input_ids=ROWS, adapter_names=NAMES).logits.float()
        got = ours(input_ids=ROWS, adapter_names=NAMES).logits.float()
    assert rel_err(got, want) < TOL.get(base, 1e-5)


@pytest.mark.parametrize("base,method", [("bnb nf4", "ia3"), ("torchao int8", "ia3"), ("bnb nf4", "dora"),
                                         ("torchao int8", "dora")])
def test_a_multi_adapter_batch_is_each_rows_own_adapter(base, method, tmp_path):
    """IA3 and DoRA (PEFT's mixed batches take neither): each row as that adapter alone gives it."""
    model = BASES[base](tmp_path)
    for name in ("default", "other"):
        fp.add_adapter(model, name, METHODS[method][0]())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():  # off their initial values: each adapter then changes its rows
            if any(key in name for key in ("ia3_l", "lora_B", "lora_magnitude")):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
        got = model(input_ids=ROWS, adapter_names=NAMES).logits.float()
        for row, name in enumerate(NAMES):
            fp.set_active_adapters(model, None if name == "__base__" else name)
            alone = model(input_ids=ROWS[row:row + 1]).logits.float()
            assert rel_err(got[row:row + 1], alone) < 1e-5, (row, name)


def test_a_tensor_subclass_without_a_rule_is_refused():
    """A weight subclass from no library fastpeft knows: not taken for a dense weight, whatever its dtype says."""

    class Packed(torch.Tensor):
        pass

    model = _tiny_llama()
    proj = model.model.layers[0].self_attn.q_proj
    proj.weight = nn.Parameter(proj.weight.detach().as_subclass(Packed), requires_grad=False)
    _refused_unchanged(model, lambda m: fp.add_adapter(m, "a", fp.LoRAConfig(target_modules=["q_proj"])),
                       fp.TargetError, match=r"layers\.0\.self_attn\.q_proj \(Linear, weight Packed float32\)",
                       logits=False)


@pytest.mark.parametrize("how", ["fused", "cublas"])
@pytest.mark.parametrize("base", ["bnb nf4 double-quant", "bnb fp4"])
def test_the_gpu_path_on_a_4bit_base_is_the_library_path(base, how, tmp_path, monkeypatch):
    """With Triton forced (the interpreter here, CUDA on a GPU) LoRA on a bitsandbytes 4-bit layer runs
    fp.ops.lora_linear_4bit on either strategy; logits, loss and adapter gradients equal the library path's (the
    CPU default: bitsandbytes' forward plus the term) within float32 tolerance."""
    pytest.importorskip("triton")
    theirs = peft.get_peft_model(BASES[base](tmp_path), METHODS["lora"][1]())
    theirs.save_pretrained(tmp_path / "peft")
    ours = fp.load_adapter(BASES[base](tmp_path), tmp_path / "peft", name="a").train()  # train: no CPU repacking
    layer = ours.model.layers[0].self_attn.q_proj
    paths, real_path = [], fp.ops.lora_4bit.path
    monkeypatch.setattr(fp.ops.lora_4bit, "path", lambda *a: paths.append(real_path(*a)) or paths[-1])
    runs = {}
    for label, backend in (("library", None), ("gpu path", "triton")):
        ours.zero_grad()
        with fp.ops.use_backend(backend), fp.ops.use_kernel_options(linear_strategy=how):
            out = ours(input_ids=IDS, labels=IDS)
            out.loss.backward()
        runs[label] = (out.logits.detach(), out.loss.item(), layer.lora_A["a"].grad.clone())
        assert set(paths) == {"torch" if backend is None else how}
        paths.clear()
    (logits, loss, grad), (logits_k, loss_k, grad_k) = runs["library"], runs["gpu path"]
    assert rel_err(logits_k, logits) < 1e-5 and loss_k == pytest.approx(loss, rel=1e-5)
    assert rel_err(grad_k, grad) < 1e-4


def _dense_twin(model, folder):
    """The float32 model whose linear layers hold the quantized ones' weights, dequantized by their library."""
    from fastpeft.modules.base_layers import dequantized_weight, quantized_kind

    if not (folder / "config.json").exists():
        _tiny_llama().save_pretrained(folder)
    dense = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    for name, module in model.named_modules():
        if quantized_kind(module):
            dense.get_submodule(name).weight.data = dequantized_weight(module).float()
    return dense


BOTTLENECKS = {"seq_bn": lambda: fp.SeqBnConfig(reduction_factor=4),
               "par_bn": lambda: fp.ParBnConfig(reduction_factor=4),
               "compacter": lambda: fp.CompacterConfig(reduction_factor=4)}


@pytest.mark.parametrize("config", list(BOTTLENECKS))
@pytest.mark.parametrize("base", ["bnb nf4 double-quant", "bnb 8-bit", "torchao int8"])
def test_bottleneck_adapters_on_quantized_linears(base, config, tmp_path):
    """AdapterHub's bottleneck family transforms the outputs of the quantized projections (o_proj, down_proj): the
    quantized model with an adapter gives what the same adapter gives on the dense model holding the dequantized
    weights; it trains (gradients reach the adapter only), and saves and loads back to the same logits."""
    model = BASES[base](tmp_path).train()  # train mode: bitsandbytes does not repack W for its bf16 CPU kernel
    dense = _dense_twin(model, tmp_path / "dense").train()
    fp.add_adapter(model, "bn", BOTTLENECKS[config]())
    fp.save_adapter(model, tmp_path / "bn", name="bn")
    fp.load_adapter(dense, tmp_path / "bn", name="bn")
    assert rel_err(_logits(model), _logits(dense)) < 1e-5

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("adapter" in n or "shared_parameters" in n for n in trainable)
    losses = sgd_losses(model, IDS)
    assert losses[-1] < losses[0]
    fp.save_adapter(model, tmp_path / "trained", name="bn")
    again = fp.load_adapter(BASES[base](tmp_path), tmp_path / "trained", name="bn").train()
    assert rel_err(_logits(again), _logits(model)) < 1e-6
