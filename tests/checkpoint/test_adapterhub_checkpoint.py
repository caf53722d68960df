"""AdapterHub checkpoints: `fp.load_adapter` on directories AdapterHub `adapters` 1.3.0 wrote
(tests/fixtures/adapterhub) gives AdapterHub's outputs for the same base weights, for every fixture case of BERT, GPT-2 and Llama (bottleneck,
Compacter, invertible adapters; pickle and safetensors files); `fp.save_adapter` writes the same keys back; bad
checkpoints leave the model unchanged."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import fastpeft as fp

pytest.importorskip("transformers")
from tests.harness import rel_err  # noqa: E402
from tests.models.tiny import snapshot, structure  # noqa: E402
from tests.test_adapterhub_fixtures import CASES, MANIFEST, ROOT, load_base  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
ATOL = 2e-5


def _inputs(family):
    return load_file(str(ROOT / MANIFEST["families"][family]["inputs"]))["input_ids"]


def _run(model, ids):
    with torch.no_grad():
        result = model(input_ids=ids, output_hidden_states=True)
    return result.logits, result.hidden_states[-1]


def _expected_logits(model, case, expected):
    """AdapterHub runs no inverse coupling in front of static HF heads (tests/fixtures/README.md); fastpeft runs it,
    as MAD-X defines: the head of the inverse of AdapterHub's hidden state."""
    if not case["adapter_config"].get("inv_adapter"):
        return expected["on.logits"]
    inv = next(m for m in model.modules() if type(m).__name__ == "InvertibleAdapters")
    head = model.get_output_embeddings()
    hidden = expected["on.last_hidden_state"]
    with torch.no_grad():
        if case["family"] == "bert":  # BERT's MLM head transforms the hidden state before the output embedding
            hidden = model.cls.predictions.transform(hidden)
        return torch.nn.functional.linear(inv._modules["fixture"](hidden, rev=True), head.weight, head.bias)


@pytest.mark.parametrize("case", CASES, ids=[f"{c['family']}-{c['case']}" for c in CASES])
def test_adapterhub_checkpoint_gives_adapterhub_outputs(case):
    model = load_base(case["family"])
    ids = _inputs(case["family"])
    expected = load_file(str(ROOT / case["dir"] / "expected.safetensors"))
    fp.load_adapter(model, ROOT / case["dir"] / "adapter", name="fixture")
    logits, hidden = _run(model, ids)
    assert (hidden - expected["on.last_hidden_state"]).abs().max() < ATOL
    assert (logits - _expected_logits(model, case, expected)).abs().max() < ATOL
    fp.set_active_adapters(model, None)
    logits, hidden = _run(model, ids)
    assert (logits - expected["off.logits"]).abs().max() < ATOL


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("variant", ["adapter_safetensors", "adapter_with_head"])
def test_safetensors_and_with_head_variants(family, variant):
    model = load_base(family)
    expected = load_file(str(ROOT / family / "seq_bn" / "expected.safetensors"))
    fp.load_adapter(model, ROOT / family / "seq_bn" / variant, name="renamed")  # another name than the saved one
    logits, _ = _run(model, _inputs(family))
    assert (logits - expected["on.logits"]).abs().max() < ATOL


@pytest.mark.parametrize("case", [c for c in CASES if c["case"] in ("seq_bn_inv", "compacter_shared_w", "seq_bn_ln")],
                         ids=lambda c: f"{c['family']}-{c['case']}")
def test_save_writes_adapterhub_keys_and_reloads(case, tmp_path):
    model = load_base(case["family"])
    fp.load_adapter(model, ROOT / case["dir"] / "adapter", name="fixture")
    before = _run(model, _inputs(case["family"]))[0]
    fp.save_adapter(model, tmp_path, "fixture")
    saved = load_file(str(tmp_path / "adapter.safetensors"))
    assert {k: list(v.shape) for k, v in saved.items()} == case["adapter_weights"]
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["config"] == case["adapter_config"] and meta["model_type"] == case["family"]
    fresh = load_base(case["family"])
    fp.load_adapter(fresh, tmp_path, name="again")
    assert rel_err(_run(fresh, _inputs(case["family"]))[0], before) < 1e-6


def _unchanged_after(model, error, match, directory):
    state, shape = snapshot(model), structure(model)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    with pytest.raises(error, match=match):
        fp.load_adapter(model, directory, name="x")
    assert list(snapshot(model)) == list(state) and all(torch.equal(snapshot(model)[k], v) for k, v in state.items())
    assert structure(model) == shape and not fp.adapters(model)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks


def test_checkpoint_for_another_model_is_refused():
    _unchanged_after(load_base("gpt2"), fp.CheckpointError, "model_type='llama'", ROOT / "llama" / "seq_bn" / "adapter")


def test_corrupted_and_incomplete_files_are_refused(tmp_path):
    source = ROOT / "llama" / "seq_bn" / "adapter"
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    data = (broken / "pytorch_adapter.bin").read_bytes()
    (broken / "pytorch_adapter.bin").write_bytes(data[: len(data) // 2])
    _unchanged_after(load_base("llama"), fp.CheckpointError, "weights-only torch file", broken)

    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(source / "adapter_config.json", partial)
    tensors = torch.load(source / "pytorch_adapter.bin", weights_only=True)
    tensors.pop(sorted(tensors)[0])
    from safetensors.torch import save_file
    save_file(tensors, str(partial / "adapter.safetensors"))
    _unchanged_after(load_base("llama"), fp.CheckpointError, "lacks 1 tensor", partial)

    wrong = tmp_path / "wrong"
    shutil.copytree(source, wrong)
    meta = json.loads((wrong / "adapter_config.json").read_text())
    meta["config"]["reduction_factor"] = 8  # the file's tensors are for 16
    (wrong / "adapter_config.json").write_text(json.dumps(meta))
    _unchanged_after(load_base("llama"), fp.CheckpointError, "shape", wrong)

    lora = tmp_path / "lora"
    shutil.copytree(source, lora)
    meta["config"]["architecture"] = "lora"
    (lora / "adapter_config.json").write_text(json.dumps(meta))
    _unchanged_after(load_base("llama"), fp.CheckpointError, "'lora' adapter", lora)
