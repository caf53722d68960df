"""LoRA checkpoints in PEFT's format: fastpeft <-> PEFT interop, fastpeft round trips, and bad input.

Tiny random models built from configs (no downloads). Adapters get non-zero lora_B (init_lora_weights=False)
and perturbed biases / modules_to_save copies, so that equal outputs mean the tensors really moved.
"""
from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch

import fastpeft as fp
from fastpeft.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from fastpeft.errors import AdapterError, CheckpointError
from fastpeft.inject.state import get_state

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

ATOL, RTOL = 1e-6, 1e-5


# ------------------------------------------------------------------------------------------------ tiny models
def _llama(hidden=32):
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg)


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4,
                                                                n_positions=64, bos_token_id=0, eos_token_id=0))


def _opt():
    return transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=97, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=32, max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=0))


def _bert():
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, num_labels=3))


def _t5():
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=97, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0))


BUILDERS = {"llama": _llama, "gpt2": _gpt2, "opt": _opt, "bert": _bert, "t5": _t5}
_BASES: dict[str, torch.nn.Module] = {}


def base(kind: str) -> torch.nn.Module:
    """A fresh copy of the (once built) tiny base model of this family, in eval mode."""
    if kind not in _BASES:
        torch.manual_seed(1234)
        _BASES[kind] = BUILDERS[kind]().eval()
    return copy.deepcopy(_BASES[kind])


INPUT = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def logits(model) -> torch.Tensor:
    model.eval()
    extra = {"decoder_input_ids": INPUT} if model.config.model_type == "t5" else {}
    return model(input_ids=INPUT, **extra).logits


@torch.no_grad()
def perturb(model, bias="all"):
    """Move the biases an adapter saves (bias="all"/"lora_only"/"none") and its modules_to_save copies away from
    the base values (a seeded, deterministic nudge)."""
    g = torch.Generator().manual_seed(3)
    suffix = {"all": ".bias", "lora_only": ".base_layer.bias"}.get(bias)
    for name, p in model.named_parameters():
        if ".modules_to_save." in name or (suffix and name.endswith(suffix) and "original_module" not in name):
            p.add_(0.1 * torch.randn(p.shape, generator=g))


# ------------------------------------------------------------------------------------------------ interop
# (family, LoRA kwargs understood by both peft.LoraConfig and fp.LoRAConfig, perturb biases/copies)
CASES = {
    "llama-plain": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), False),
    "llama-rslora": ("llama", dict(r=4, lora_alpha=16, use_rslora=True,
                                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), False),
    "llama-all-linear": ("llama", dict(r=2, lora_alpha=5, target_modules="all-linear"), False),
    "llama-patterns": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                     rank_pattern={"model.layers.1.self_attn.q_proj": 3, "down_proj": 6},
                                     alpha_pattern={"v_proj": 3}), False),
    "llama-modules-to-save": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            modules_to_save=["lm_head"]), True),
    "llama-layers": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"],
                                   layers_to_transform=[1]), False),
    "gpt2-conv1d": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"]), False),
    "gpt2-bias-all": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn"], bias="all"), True),
    "gpt2-bias-lora-only": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                         bias="lora_only"), True),
    "opt-bias-lora-only": ("opt", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"],
                                       bias="lora_only"), True),
    "bert-bias-all-modules-to-save": ("bert", dict(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                   bias="all", modules_to_save=["classifier"]), True),
    "t5-all-linear": ("t5", dict(r=2, lora_alpha=4, target_modules="all-linear"), False),
}


def _peft_model(kind, kwargs, nudge):
    torch.manual_seed(0)
    model = peft.get_peft_model(base(kind), peft.LoraConfig(init_lora_weights=False, **kwargs)).eval()
    if nudge:
        perturb(model, kwargs.get("bias", "none"))
    return model


def _fp_model(kind, kwargs, nudge):
    torch.manual_seed(0)
    model = fp.add_adapter(base(kind), "default", fp.LoRAConfig(init_lora_weights=False, **kwargs)).eval()
    if nudge:
        perturb(model, kwargs.get("bias", "none"))
    return model


def _peft_wrapped(model) -> set[str]:
    """Module paths (relative to the base model) that PEFT wrapped with LoRA."""
    from peft.tuners.lora import LoraLayer

    inner = model.get_base_model()
    return {n for n, m in inner.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_checkpoint_loads_into_fastpeft(case, tmp_path):
    kind, kwargs, nudge = CASES[case]
    pm = _peft_model(kind, kwargs, nudge)
    pm.save_pretrained(tmp_path)
    expected = logits(pm)
    model = fp.load_adapter(base(kind), tmp_path)
    assert not torch.equal(expected, logits(base(kind))), "the adapter must change the outputs"
    torch.testing.assert_close(logits(model), expected, atol=ATOL, rtol=RTOL)
    assert set(get_state(model).modules["default"]) == _peft_wrapped(pm)
    # Saved again by fastpeft: PEFT's file, tensor for tensor.
    fp.save_adapter(model, tmp_path / "again")
    theirs, ours = load_file(tmp_path / WEIGHTS_NAME), load_file(tmp_path / "again" / WEIGHTS_NAME)
    _assert_identical(ours, theirs)


@pytest.mark.parametrize("case", sorted(CASES))
def test_fastpeft_checkpoint_loads_into_peft(case, tmp_path):
    kind, kwargs, nudge = CASES[case]
    model = _fp_model(kind, kwargs, nudge)
    fp.save_adapter(model, tmp_path / "fp")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(base(kind), tmp_path / "fp").eval()
    bad = [str(w.message) for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message)]
    assert not bad, bad
    torch.testing.assert_close(logits(pm), logits(model), atol=ATOL, rtol=RTOL)
    assert _peft_wrapped(pm) == set(get_state(model).modules["default"])

    # Same adapter written by PEFT: the same file layout (keys, shapes, dtypes).
    _peft_model(kind, kwargs, nudge).save_pretrained(tmp_path / "peft")
    ours, theirs = load_file(tmp_path / "fp" / WEIGHTS_NAME), load_file(tmp_path / "peft" / WEIGHTS_NAME)
    assert sorted(ours) == sorted(theirs)
    assert all(ours[k].shape == theirs[k].shape and ours[k].dtype == theirs[k].dtype for k in ours)


def test_saved_config_fields(tmp_path):
    model = _fp_model("gpt2", dict(r=4, lora_alpha=16, target_modules=["c_attn"], lora_dropout=0.1), False)
    model.config._name_or_path = "tiny/gpt2"
    fp.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 16 and cfg["lora_dropout"] == 0.1
    assert cfg["target_modules"] == ["c_attn"] and cfg["fan_in_fan_out"] is True and cfg["use_dora"] is False
    assert cfg["base_model_name_or_path"] == "tiny/gpt2" and cfg["inference_mode"] is True
    assert cfg["bias"] == "none" and cfg["use_rslora"] is False and cfg["modules_to_save"] is None
    loaded = peft.PeftConfig.from_pretrained(tmp_path)
    assert loaded.peft_type == peft.PeftType.LORA and loaded.lora_alpha == 16


def test_saved_targets_are_exact(tmp_path):
    """Leaf names when they pick exactly the wrapped layers, full paths otherwise (layers_to_transform, excludes)."""
    def targets(**kwargs):
        model = fp.add_adapter(base("llama"), "default", fp.LoRAConfig(r=2, **kwargs))
        fp.save_adapter(model, tmp_path)
        return json.loads((tmp_path / CONFIG_NAME).read_text())["target_modules"]

    assert targets(target_modules="all-linear") == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert targets(target_modules=r".*\.(q|v)_proj") == ["q_proj", "v_proj"]
    assert targets(target_modules=["q_proj"], exclude_modules=["model.layers.0.self_attn.q_proj"]) == [
        "model.layers.1.self_attn.q_proj"]
    assert targets(target_modules=["v_proj"], layers_to_transform=0) == ["model.layers.0.self_attn.v_proj"]


def test_peft_task_model_checkpoint(tmp_path):
    """PEFT's SEQ_CLS models list "classifier" and "score" in modules_to_save; BERT only has the first."""
    torch.manual_seed(0)
    pm = peft.get_peft_model(base("bert"), peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules="all-linear",
                                                           init_lora_weights=False)).eval()
    perturb(pm, "none")
    pm.save_pretrained(tmp_path)
    model = fp.load_adapter(base("bert"), tmp_path)
    torch.testing.assert_close(logits(model), logits(pm), atol=ATOL, rtol=RTOL)
    assert get_state(model).saved["default"] == ["classifier"]


# ------------------------------------------------------------------------------------------------ round trips
def _adapter_tensors(model, name) -> dict[str, torch.Tensor]:
    state = get_state(model)
    out = {}
    for path in state.modules[name]:
        layer = model.get_submodule(path)
        out[f"{path}.A"], out[f"{path}.B"] = layer.lora_A[name], layer.lora_B[name]
    for path in state.saved[name]:
        for k, v in model.get_submodule(path).modules_to_save[name].state_dict().items():
            out[f"{path}.{k}"] = v
    return out


def _assert_identical(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("case", ["llama-patterns", "llama-modules-to-save", "gpt2-bias-all", "llama-layers"])
def test_round_trip_is_bit_identical(case, tmp_path):
    kind, kwargs, nudge = CASES[case]
    model = _fp_model(kind, kwargs, nudge)
    fp.save_adapter(model, tmp_path)
    rng = torch.get_rng_state()
    fresh = fp.load_adapter(base(kind), tmp_path)
    assert torch.equal(torch.get_rng_state(), rng), "loading must not consume the caller's random numbers"
    assert torch.equal(logits(fresh), logits(model))
    _assert_identical(_adapter_tensors(fresh, "default"), _adapter_tensors(model, "default"))
    paths = get_state(model).modules["default"]
    assert get_state(fresh).modules["default"] == paths and get_state(fresh).saved == get_state(model).saved
    for path in paths:
        a, b = fresh.get_submodule(path), model.get_submodule(path)
        assert (a.r, a.alpha, a.scaling, a.dropout) == (b.r, b.alpha, b.scaling, b.dropout), path
    assert dict(fresh.state_dict()).keys() == dict(model.state_dict()).keys()
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_several_adapters_by_name(tmp_path):
    model = _fp_model("llama", CASES["llama-plain"][1], False)
    fp.add_adapter(model, "mlp", fp.LoRAConfig(r=3, alpha=6, target_modules=["up_proj", "down_proj"],
                                               modules_to_save=["lm_head"], init_weights=False))
    perturb(model, "none")
    outputs = {}
    for name in ("default", "mlp"):
        fp.set_active_adapters(model, name)
        outputs[name] = logits(model)
        fp.save_adapter(model, tmp_path / name, name)

    fresh = base("llama")
    fp.load_adapter(fresh, tmp_path / "mlp", name="mlp")
    fp.load_adapter(fresh, tmp_path / "default")
    fp.load_adapter(fresh, tmp_path / "mlp", name="again")
    assert list(fp.adapters(fresh)) == ["mlp", "default", "again"]
    for name, source in (("default", "default"), ("mlp", "mlp"), ("again", "mlp")):
        fp.set_active_adapters(fresh, name)
        assert torch.equal(logits(fresh), outputs[source]), name
        _assert_identical(_adapter_tensors(fresh, name), _adapter_tensors(model, source))


def test_other_adapters_do_not_leak_into_the_file(tmp_path):
    """Saved from a model with two adapters, the file is what PEFT writes for that adapter alone; and a PEFT
    checkpoint loads next to an adapter that already wraps other layers."""
    kind, kwargs, _ = CASES["gpt2-bias-all"]
    model = fp.add_adapter(base(kind), "other", fp.LoRAConfig(r=2, target_modules=["c_proj", "c_fc"],
                                                              init_weights=False))
    fp.add_adapter(model, "default", fp.LoRAConfig(init_lora_weights=False, **kwargs))
    fp.set_active_adapters(model, "default")
    perturb(model, "all")
    fp.save_adapter(model, tmp_path / "fp")
    _peft_model(kind, kwargs, True).save_pretrained(tmp_path / "peft")
    assert sorted(load_file(tmp_path / "fp" / WEIGHTS_NAME)) == sorted(load_file(tmp_path / "peft" / WEIGHTS_NAME))
    pm = peft.PeftModel.from_pretrained(base(kind), tmp_path / "fp").eval()
    torch.testing.assert_close(logits(pm), logits(model), atol=ATOL, rtol=RTOL)

    pm = _peft_model(kind, kwargs, True)
    fresh = fp.add_adapter(base(kind), "other", fp.LoRAConfig(r=2, target_modules=["c_proj"], init_weights=False))
    fp.load_adapter(fresh, tmp_path / "peft", name="peft")
    fp.set_active_adapters(fresh, "peft")
    torch.testing.assert_close(logits(fresh), logits(pm), atol=ATOL, rtol=RTOL)


def test_existing_name_is_an_error(tmp_path):
    model = _fp_model("llama", CASES["llama-plain"][1], False)
    fp.save_adapter(model, tmp_path)
    before = snapshot(model)
    with pytest.raises(AdapterError, match="already has an adapter named 'default'"):
        fp.load_adapter(model, tmp_path)
    assert_unchanged(model, before)


def test_half_precision_base_keeps_float32_adapters(tmp_path):
    torch.manual_seed(0)
    model = fp.add_adapter(base("llama").to(torch.bfloat16), "default",
                           fp.LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False))
    assert model.model.layers[0].self_attn.q_proj.lora_A["default"].dtype == torch.float32
    fp.save_adapter(model, tmp_path)
    assert all(v.dtype == torch.float32 for v in load_file(tmp_path / WEIGHTS_NAME).values())
    fresh = fp.load_adapter(base("llama").to(torch.bfloat16), tmp_path)
    _assert_identical(_adapter_tensors(fresh, "default"), _adapter_tensors(model, "default"))
    assert torch.equal(logits(fresh), logits(model))


def test_tensors_are_cast_to_the_adapter_dtype(tmp_path):
    model = _fp_model("llama", CASES["llama-plain"][1], False)
    fp.save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    save_file({k: v.half() for k, v in tensors.items()}, tmp_path / WEIGHTS_NAME, metadata={"format": "pt"})
    fresh = fp.load_adapter(base("llama"), tmp_path)
    a = fresh.model.layers[0].self_attn.q_proj.lora_A["default"]
    assert a.dtype == torch.float32
    assert torch.equal(a, tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].half().float())


def test_save_is_atomic_and_creates_the_directory(tmp_path, monkeypatch):
    model = _fp_model("llama", CASES["llama-plain"][1], False)
    target = tmp_path / "a" / "b"
    fp.save_adapter(model, target)
    assert sorted(os.listdir(target)) == [CONFIG_NAME, WEIGHTS_NAME]
    old = (target / WEIGHTS_NAME).read_bytes()

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr("fastpeft.checkpoint.files.os.fsync", boom)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_A["default"].add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        fp.save_adapter(model, target)
    assert (target / WEIGHTS_NAME).read_bytes() == old
    assert sorted(os.listdir(target)) == [CONFIG_NAME, WEIGHTS_NAME], "no temporary file may be left behind"


# ------------------------------------------------------------------------------------------------ bad input
def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(m)) for n, m in model.named_modules()],
            {n: p.requires_grad for n, p in model.named_parameters()},
            dict(fp.adapters(model)))


def assert_unchanged(model, before):
    state, types, grads, adapters = before
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    assert dict(fp.adapters(model)) == adapters
    now = model.state_dict()
    assert sorted(now) == sorted(state)
    for k, v in state.items():
        assert torch.equal(now[k], v), k
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


@pytest.fixture
def saved_llama(tmp_path):
    """A fastpeft Llama adapter (q_proj, v_proj, r=4) saved in tmp_path/ckpt."""
    fp.save_adapter(_fp_model("llama", CASES["llama-plain"][1], False), tmp_path / "ckpt")
    return tmp_path / "ckpt"


@pytest.fixture(params=["plain", "with-adapter"])
def target_model(request):
    """A base Llama, or one that already carries another adapter (which must survive a failed load)."""
    model = base("llama")
    if request.param == "with-adapter":
        fp.add_adapter(model, "other", fp.LoRAConfig(r=2, target_modules=["q_proj", "o_proj"], bias="all",
                                                     modules_to_save=["lm_head"]))
    return model


def _edit_config(path, **changes):
    cfg = json.loads((path / CONFIG_NAME).read_text())
    cfg.update(changes)
    (path / CONFIG_NAME).write_text(json.dumps(cfg))


def _edit_tensors(path, fn):
    tensors = load_file(path / WEIGHTS_NAME)
    fn(tensors)
    save_file(tensors, path / WEIGHTS_NAME, metadata={"format": "pt"})


def _expect_error(model, directory, *patterns, name="default"):
    before = snapshot(model)
    with pytest.raises(CheckpointError) as info:
        fp.load_adapter(model, directory, name=name)
    for pattern in patterns:
        assert pattern in str(info.value), str(info.value)
    assert_unchanged(model, before)
    return str(info.value)


def test_missing_directory(target_model, tmp_path):
    _expect_error(target_model, tmp_path / "nope", "nope", "is not a directory")


def test_missing_config(target_model, saved_llama):
    _expect_error(target_model, saved_llama.parent, CONFIG_NAME, "is missing", "Subfolders with an adapter", "ckpt")
    os.remove(saved_llama / CONFIG_NAME)
    _expect_error(target_model, saved_llama, CONFIG_NAME, "is missing")


def test_missing_weights(target_model, saved_llama):
    os.remove(saved_llama / WEIGHTS_NAME)
    _expect_error(target_model, saved_llama, WEIGHTS_NAME, "is missing")
    (saved_llama / "adapter_model.bin").write_bytes(b"pickle")
    _expect_error(target_model, saved_llama, "pickle")


def test_truncated_file(target_model, saved_llama):
    data = (saved_llama / WEIGHTS_NAME).read_bytes()
    (saved_llama / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    _expect_error(target_model, saved_llama, WEIGHTS_NAME, "truncated or corrupted")


def test_corrupted_header(target_model, saved_llama):
    data = bytearray((saved_llama / WEIGHTS_NAME).read_bytes())
    data[8:24] = b"\xff" * 16
    (saved_llama / WEIGHTS_NAME).write_bytes(bytes(data))
    _expect_error(target_model, saved_llama, WEIGHTS_NAME, "truncated or corrupted")


def test_corrupted_config(target_model, saved_llama):
    (saved_llama / CONFIG_NAME).write_text('{"peft_type": "LORA", "r": ')
    _expect_error(target_model, saved_llama, CONFIG_NAME, "not readable JSON")


def test_other_base_model_hidden_size(target_model, tmp_path):
    fp.save_adapter(fp.add_adapter(_llama(hidden=48), "x", fp.LoRAConfig(r=4, target_modules=["q_proj"])),
                    tmp_path, "x")
    _expect_error(target_model, tmp_path, WEIGHTS_NAME, "model.layers.0.self_attn.q_proj.lora_A.weight",
                  "(4, 48)", "(4, 32)", "other layer sizes")


def test_rank_disagrees_with_config(target_model, saved_llama):
    _edit_config(saved_llama, r=8)
    _expect_error(target_model, saved_llama, "model.layers.0.self_attn.q_proj.lora_A.weight", "(4, 32)",
                  "(r, in_features) of model.layers.0.self_attn.q_proj is (8, 32)", "r (or rank_pattern)")


def test_llama_adapter_into_gpt2(saved_llama):
    message = _expect_error(base("gpt2"), saved_llama, CONFIG_NAME, "q_proj", "another base model")
    assert "c_proj" in message  # names the model does have


def test_unexpected_key(target_model, saved_llama):
    key = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    _edit_tensors(saved_llama, lambda t: t.update({key: torch.randn(4, 32)}))
    _expect_error(target_model, saved_llama, key, "match no module")


def test_missing_key(target_model, saved_llama):
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    _edit_tensors(saved_llama, lambda t: t.pop(key))
    _expect_error(target_model, saved_llama, key, "lacks")


def test_bias_key_without_bias_config(target_model, saved_llama):
    key = "base_model.model.model.norm.bias"
    _edit_tensors(saved_llama, lambda t: t.update({key: torch.randn(32)}))
    _expect_error(target_model, saved_llama, key)


@pytest.mark.parametrize("change, pattern", [
    (dict(peft_type="VERA"), "peft_type='VERA'"),
    (dict(peft_type=None), "peft_type=None"),
    (dict(lora_bias=True), "lora_B"),
    (dict(layer_replication=[[0, 1]]), "layer replication"),
    (dict(target_parameters=["mlp.experts.gate_up_proj"]), "target_parameters"),
    (dict(use_shiny_new_thing=True), "use_shiny_new_thing"),
    (dict(bias="sometimes"), "bias"),
    (dict(r=0), "r"),
])
def test_unsupported_config(target_model, saved_llama, change, pattern):
    _edit_config(saved_llama, **change)
    _expect_error(target_model, saved_llama, CONFIG_NAME, pattern)


def test_lora_file_read_as_dora(target_model, saved_llama):
    _edit_config(saved_llama, use_dora=True)
    _expect_error(target_model, saved_llama, WEIGHTS_NAME, "lacks", "lora_magnitude_vector")


def test_ignored_config_fields(saved_llama):
    """Init schemes, metadata and off switches do not matter for loaded tensors."""
    _edit_config(saved_llama, init_lora_weights="pissa", use_dora=False, loftq_config={}, task_type="CAUSAL_LM",
                 some_future_flag=None, auto_mapping={"base_model_class": "LlamaForCausalLM"})
    fp.load_adapter(base("llama"), saved_llama)


@pytest.mark.parametrize("with_adapter", [False, True])
def test_rollback_when_copying_fails(tmp_path, monkeypatch, with_adapter):
    """A failure after the adapter was added removes it again and restores the biases it overwrote."""
    kind, kwargs, _ = CASES["gpt2-bias-all"]
    fp.save_adapter(_fp_model(kind, kwargs, True), tmp_path)
    import fastpeft.checkpoint.lora as ckpt

    real = ckpt._match

    def broken(*args, **kw):
        return [*real(*args, **kw), ("lora_A", "transformer.h.0.attn.c_attn", torch.zeros(7, 7, 7))]

    monkeypatch.setattr(ckpt, "_match", broken)
    model = base(kind)
    if with_adapter:
        fp.add_adapter(model, "other", fp.LoRAConfig(r=2, target_modules=["c_attn", "c_fc"], bias="lora_only"))
    before = snapshot(model)
    with pytest.raises(RuntimeError):
        fp.load_adapter(model, tmp_path)
    assert_unchanged(model, before)
