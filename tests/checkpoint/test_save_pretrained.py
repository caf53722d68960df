"""model.save_pretrained on a model holding fastpeft adapters: the adapters in PEFT's multi-adapter layout (read back
by fp.load_adapter, PEFT and transformers' from_pretrained), or, with an adapter merged, the full model under the
original key names that plain from_pretrained reloads; refused where the reloaded model would compute differently.
Whatever is installed for this goes with the last adapter."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

import fastpeft as fp

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from tests.harness import rel_err  # noqa: E402
from tests.models.tiny import model, out  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


def _keys(path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


def _params(m, name: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in m.named_parameters() if f".{name}." in k or k.endswith(f".{name}")}


def test_several_adapters_in_peft_layout(tmp_path):
    m = model("llama")
    fp.add_adapter(m, "chat", fp.LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False))
    fp.add_adapter(m, "default", fp.LoRAConfig(r=2, target_modules=["o_proj"], init_weights=False))
    fp.add_adapter(m, "bn", fp.SeqBnConfig(reduction_factor=8, init_weights="mam"))
    m.save_pretrained(tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path))  # "default" at the root
    assert "config.json" not in os.listdir(tmp_path)
    assert (tmp_path / "chat" / "adapter_model.safetensors").is_file()
    assert "peft_type" not in json.loads((tmp_path / "bn" / "adapter_config.json").read_text())  # AdapterHub's
    for name in ("default", "chat", "bn"):
        loaded = model("llama")
        fp.load_adapter(loaded, tmp_path, name=name)
        mine, theirs = _params(m, name), _params(loaded, name)
        assert mine.keys() == theirs.keys() and mine and all(torch.equal(mine[k], theirs[k]) for k in mine)
    pm = peft.PeftModel.from_pretrained(model("llama"), str(tmp_path))
    pm.load_adapter(str(tmp_path / "chat"), adapter_name="chat")
    for name in ("default", "chat"):
        fp.set_active_adapters(m, name)
        pm.set_adapter(name)
        assert rel_err(out(pm), out(m)) < 1e-6, name


def test_adapter_folder_reloads_through_transformers_from_pretrained(tmp_path):
    model("llama").save_pretrained(tmp_path / "base")
    m = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    fp.add_adapter(m, "default", fp.LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False))
    m.save_pretrained(tmp_path / "adapter")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()  # base + adapter
    assert rel_err(out(loaded), out(m)) < 1e-6


def _lora(kind: str) -> fp.LoRAConfig:
    return fp.LoRAConfig(r=4, target_modules={"llama": ["q_proj", "down_proj"], "bert": ["query", "value"]}[kind],
                         init_weights=False, modules_to_save=["classifier"] if kind == "bert" else None)


@pytest.mark.parametrize("kind, config, dtype", [
    ("llama", _lora("llama"), torch.float32), ("llama", _lora("llama"), torch.bfloat16),
    ("gpt2", fp.IA3Config(init_weights=False), torch.float32), ("bert", _lora("bert"), torch.float32)],
    ids=["llama_lora", "llama_lora_bf16", "gpt2_ia3", "bert_lora_modules_to_save"])
def test_merged_model_saves_the_full_model_under_original_names(tmp_path, kind, config, dtype):
    m = model(kind).to(dtype)
    fp.add_adapter(m, "a", config)
    fp.add_adapter(m, "idle", fp.SeqBnConfig(reduction_factor=8))  # inactive: no part of the full model
    if kind == "bert":
        with torch.no_grad():  # the classifier copy that modules_to_save trains now differs from the original
            m.classifier.modules_to_save["a"].weight.mul_(-2)
    adapted = out(m)
    fp.merge_adapter(m, "a")
    merged = out(m)
    m.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors"} <= set(os.listdir(tmp_path))
    assert not (tmp_path / "adapter_config.json").exists()
    keys = _keys(tmp_path / "model.safetensors")
    assert keys == set(model(kind).state_dict()) - {"lm_head.weight"} or keys == set(model(kind).state_dict())
    reloaded = type(m).from_pretrained(tmp_path, dtype=dtype).eval()
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-6  # bf16: .to(dtype) also rounds RoPE's inv_freq buffer
    assert rel_err(out(reloaded), merged) < tolerance and rel_err(out(reloaded), adapted) < tolerance
    expected = fp.unload(m, merge=True).state_dict()  # what merging for good leaves
    assert reloaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in reloaded.state_dict().items())


def _active_lora(m):
    fp.add_adapter(m, "b", fp.LoRAConfig(r=2, target_modules=["k_proj"]))
    fp.set_active_adapters(m, ["a", "b"])


def _active_bottleneck(m):
    fp.add_adapter(m, "bn", fp.SeqBnConfig(reduction_factor=8))
    fp.set_active_adapters(m, ["a", "bn"])


def _prefix(m):
    fp.add_adapter(m, "p", fp.PrefixTuningConfig(prefix_length=3, bottleneck_size=8))  # inactive


@pytest.mark.parametrize("add, match", [(_active_lora, "active adapter 'b'.*fp.merge_adapter"),
                                        (_active_bottleneck, "active adapter 'bn'.*cannot be merged"),
                                        (_prefix, "attention-level adapters")],
                         ids=["active_unmerged_lora", "active_bottleneck", "prefix_tuning"])
def test_full_save_that_would_reload_differently_is_refused(tmp_path, add, match):
    m = model("llama")
    fp.add_adapter(m, "a", _lora("llama"))
    add(m)
    fp.merge_adapter(m, "a")
    with pytest.raises(fp.CheckpointError, match=match):
        m.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_modules_to_save_copy_of_a_tied_weight_is_refused(tmp_path):
    m = model("gpt2")  # lm_head is tied to the token embeddings
    fp.add_adapter(m, "a", fp.LoRAConfig(r=2, target_modules=["c_attn"], modules_to_save=["lm_head"]))
    fp.merge_adapter(m, "a")
    with pytest.raises(fp.CheckpointError, match="ties .*lm_head.weight"):
        m.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_adapters_and_full_models_never_share_a_folder(tmp_path):
    m = model("llama")
    fp.add_adapter(m, "a", _lora("llama"))
    m.save_pretrained(tmp_path / "adapters")
    m.save_pretrained(tmp_path / "adapters")  # saving again over its own files is fine
    model("llama").save_pretrained(tmp_path / "full")
    before = sorted(os.listdir(tmp_path / "full"))
    with pytest.raises(fp.CheckpointError, match="already holds a full model"):
        m.save_pretrained(tmp_path / "full")
    assert sorted(os.listdir(tmp_path / "full")) == before
    fp.merge_adapter(m, "a")
    with pytest.raises(fp.CheckpointError, match="already holds an adapter checkpoint"):
        m.save_pretrained(tmp_path / "adapters")
    with pytest.raises(fp.CheckpointError, match="model.push_to_hub"):
        fp.unmerge_adapter(m).save_pretrained(tmp_path / "hub", push_to_hub=True)


@pytest.mark.parametrize("remove", ["unload", "delete_adapter"])
def test_the_last_adapter_takes_save_pretrained_and_its_hooks_along(tmp_path, remove):
    m = model("llama")
    attributes, hooks = dict(vars(m)), (dict(m._load_state_dict_pre_hooks), dict(m._load_state_dict_post_hooks))
    fp.add_adapter(m, "a", _lora("llama"))
    m.save_pretrained(tmp_path / "adapter")
    assert "adapter_config.json" in os.listdir(tmp_path / "adapter")
    fp.unload(m) if remove == "unload" else fp.delete_adapter(m, "a")
    assert vars(m).keys() == attributes.keys() and all(vars(m)[k] is v for k, v in attributes.items()
                                                        if k not in ("_modules", "_parameters", "_buffers"))
    assert (dict(m._load_state_dict_pre_hooks), dict(m._load_state_dict_post_hooks)) == hooks
    m.save_pretrained(tmp_path / "plain")  # transformers' own again: the full model
    assert {"config.json", "model.safetensors"} <= set(os.listdir(tmp_path / "plain"))
    assert _keys(tmp_path / "plain" / "model.safetensors") == set(model("llama").state_dict())
