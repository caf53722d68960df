"""Prompt tuning and P-tuning checkpoints in PEFT's format: PEFT -> fastpeft and fastpeft -> PEFT with the same
logits (and, for a causal LM, the same generated tokens), fastpeft round trips, and checkpoints that do not fit
refused with the model unchanged."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastpeft as fp
from fastpeft.checkpoint import CONFIG_NAME, WEIGHTS_NAME

peft = pytest.importorskip("peft")
from tests.models.test_prompt_models import prompt_of, unchanged  # noqa: E402
from tests.models.tiny import IDS, model, out  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
TASKS = {"llama": "CAUSAL_LM", "mistral": "CAUSAL_LM", "qwen2": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS",
         "t5": "SEQ_2_SEQ_LM"}
PEFT_CONFIGS = {  # PEFT's defaults: T5 (SEQ_2_SEQ_LM) gets num_transformer_submodules=2
    "prompt": lambda task: peft.PromptTuningConfig(task_type=task, num_virtual_tokens=3),
    "mlp": lambda task: peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=3, encoder_hidden_size=16),
    "lstm": lambda task: peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=3, encoder_hidden_size=8,
                                                  encoder_reparameterization_type="LSTM"),
}
FP_CONFIGS = {"prompt": lambda: fp.PromptTuningConfig(prompt_length=4),
              "mlp": lambda: fp.PTuningConfig(prompt_length=4, encoder_hidden_size=8),
              "lstm": lambda: fp.PTuningConfig(prompt_length=4, encoder_type="LSTM", encoder_hidden_size=8)}


def _out(m):
    if isinstance(m, peft.PeftModel):
        with torch.no_grad():
            if m.config.is_encoder_decoder:
                return m(input_ids=IDS, decoder_input_ids=IDS[:, :4]).logits
            return m(input_ids=IDS).logits
    return out(m)


@pytest.mark.parametrize("kind", list(TASKS))
@pytest.mark.parametrize("cfg", list(PEFT_CONFIGS))
def test_peft_checkpoint_loads_into_fastpeft(kind, cfg, tmp_path):
    torch.manual_seed(0)
    pm = peft.get_peft_model(model(kind), PEFT_CONFIGS[cfg](TASKS[kind])).eval()
    if kind == "bert":  # PEFT trains and saves the classifier with SEQ_CLS: make it differ from the base model's
        with torch.no_grad():
            pm.base_model.classifier.modules_to_save["default"].weight.add_(0.5)
    pm.save_pretrained(tmp_path)
    m = model(kind)
    fp.load_adapter(m, tmp_path, name="x")
    config = fp.adapters(m)["x"]
    assert config.method == ("prompt_tuning" if cfg == "prompt" else "p_tuning") and config.prompt_length == 3
    torch.testing.assert_close(out(m), _out(pm), atol=1e-6, rtol=1e-5)
    if cfg != "prompt":
        assert config.inference_mode  # the checkpoint holds the encoder's output, not the encoder


@pytest.mark.parametrize("kind", list(TASKS))
@pytest.mark.parametrize("cfg", list(FP_CONFIGS))
def test_fastpeft_checkpoint_loads_into_peft(kind, cfg, tmp_path):
    m = model(kind)
    fp.add_adapter(m, "a", FP_CONFIGS[cfg]())
    fp.save_adapter(m, tmp_path, "a")
    raw = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert raw["task_type"] == TASKS[kind] and raw["num_transformer_submodules"] == 1
    assert raw["peft_type"] == ("PROMPT_TUNING" if cfg == "prompt" else "P_TUNING")
    pm = peft.PeftModel.from_pretrained(model(kind), tmp_path).eval()
    torch.testing.assert_close(_out(pm), out(m), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generation_matches_peft(kind, tmp_path):
    torch.manual_seed(0)
    pm = peft.get_peft_model(model(kind), PEFT_CONFIGS["prompt"]("CAUSAL_LM"))
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.mul_(3)
    pm.eval().save_pretrained(tmp_path)
    m = model(kind)
    fp.load_adapter(m, tmp_path)
    mask = torch.ones_like(IDS)
    mask[1, :2] = 0
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(m.generate(IDS, **kw), pm.generate(input_ids=IDS, **kw))


def test_peft_text_init_matches_from_string(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(["[UNK]", "[PAD]"] + [f"w{i}" for i in range(98)])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(tmp_path)
    text = "w5 w17 w42"
    pm = peft.get_peft_model(model(), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=7, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
        tokenizer_name_or_path=str(tmp_path)))
    m = model()
    fp.add_adapter(m, "a", fp.PromptTuningConfig(prompt_length=7, prompt_init="from_string", prompt_init_text=text,
                                                 tokenizer_name_or_path=str(tmp_path)))
    assert torch.equal(prompt_of(m), pm.prompt_encoder["default"].embedding.weight.detach())


@pytest.mark.parametrize("kind", ["llama", "bert", "t5"])
@pytest.mark.parametrize("config", [fp.PromptTuningConfig(prompt_length=3, combine="prefix_after_bos"),
                                    fp.PTuningConfig(prompt_length=2, encoder_type="LSTM"),
                                    fp.PromptTuningConfig(prompt_length=5, modules_to_save=["lm_head", "classifier"])],
                         ids=["after_bos", "lstm", "saved"])
def test_round_trip(kind, config, tmp_path):
    m = model(kind)
    if config.modules_to_save:
        config = fp.PromptTuningConfig(prompt_length=5, modules_to_save=["classifier" if kind == "bert" else "lm_head"])
    fp.add_adapter(m, "a", config)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    fp.save_adapter(m, tmp_path, "a")
    fresh = model(kind)
    fp.load_adapter(fresh, tmp_path, name="b")
    torch.testing.assert_close(out(fresh), out(m), atol=1e-6, rtol=1e-5)
    loaded = fp.adapters(fresh)["b"]
    assert loaded.prompt_length == config.prompt_length
    if isinstance(config, fp.PromptTuningConfig):
        assert loaded.combine == config.combine
    assert set(loaded.modules_to_save or []) >= set(config.modules_to_save or [])
    fp.unload(fresh)
    assert torch.equal(out(fresh), out(model(kind)))


def _saved(tmp_path, kind="llama"):
    m = model(kind)
    fp.add_adapter(m, "a", fp.PromptTuningConfig(prompt_length=3))
    fp.save_adapter(m, tmp_path, "a")
    return tmp_path


def _edit(path, tensors=None, config=None):
    if tensors:
        t = load_file(str(path / WEIGHTS_NAME))
        tensors(t)
        save_file(t, str(path / WEIGHTS_NAME))
    if config:
        raw = json.loads((path / CONFIG_NAME).read_text())
        raw.update(config)
        (path / CONFIG_NAME).write_text(json.dumps(raw))


@pytest.mark.parametrize("tensors, config, match", [
    (lambda t: t.update(prompt_embeddings=t["prompt_embeddings"][:2].contiguous()), None, "has shape"),
    (lambda t: t.pop("prompt_embeddings"), None, "lacks 1 tensor"),
    (lambda t: t.update({"base_model.model.norm.weight": torch.ones(32)}), None, "match no module"),
    (None, dict(num_virtual_tokens=4), "has shape"),
    (None, dict(token_dim=64), "token_dim=64"),
    (None, dict(num_transformer_submodules=2), "num_transformer_submodules"),
    (None, dict(some_new_option=True), "some_new_option"),
    (None, dict(modules_to_save=["norm"]), "lacks 1 tensor"),
])
def test_checkpoints_that_do_not_fit(tmp_path, tensors, config, match):
    path = _saved(tmp_path)
    _edit(path, tensors, config)
    m = model()
    fp.add_adapter(m, "other", fp.LoRAConfig())
    with unchanged(m), pytest.raises(fp.CheckpointError, match=match):
        fp.load_adapter(m, path)


def test_peft_t5_default_keeps_2p_rows_and_feeds_the_encoder_the_first_p(tmp_path):
    pm = peft.get_peft_model(model("t5"), peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3))
    assert pm.peft_config["default"].num_transformer_submodules == 2
    pm.eval().save_pretrained(tmp_path)
    m = model("t5")
    fp.load_adapter(m, tmp_path)
    assert fp.adapters(m)["default"].prompt_length == 3
    torch.testing.assert_close(out(m), _out(pm), atol=1e-6, rtol=1e-5)


def test_gpt2_checkpoint_into_llama_with_other_width(tmp_path):
    big = model("bert")
    fp.add_adapter(big, "a", fp.PromptTuningConfig(prompt_length=3))
    fp.save_adapter(big, tmp_path, "a")
    _edit(tmp_path, lambda t: t.update(prompt_embeddings=torch.zeros(3, 48)), dict(token_dim=48))
    m = model("llama")
    with unchanged(m), pytest.raises(fp.CheckpointError, match="token_dim=48"):
        fp.load_adapter(m, tmp_path)
