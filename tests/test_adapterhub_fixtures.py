"""The AdapterHub reference fixtures (tests/fixtures/adapterhub, made by tests/fixtures/make_adapterhub_fixtures.py
with AdapterHub 1.3.0 on transformers 4.57) are complete and usable from the installed transformers.

For every case of the manifest: its files exist, the AdapterHub adapter files read back (`torch.load(...,
weights_only=True)` or safetensors) with the parameter names and shapes the manifest lists, and the base model,
rebuilt from `base/config.json` with the installed transformers and loaded strictly from `base/model.safetensors`,
gives the stored outputs with the adapter off. The AdapterHub-import tests build on exactly this.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent / "fixtures" / "adapterhub"
MANIFEST = json.loads((ROOT / "manifest.json").read_text())
CASES = [c for c in MANIFEST["cases"] if c["status"] == "ok"]
SKIPPED = [c for c in MANIFEST["cases"] if c["status"] != "ok"]
ATOL = 1e-5


def load_base(family: str) -> torch.nn.Module:
    """The fixture base of `family`, rebuilt from its config and loaded strictly (tied weights re-tied)."""
    info = MANIFEST["families"][family]
    base_dir = ROOT / info["base_dir"]
    config = transformers.AutoConfig.from_pretrained(base_dir)
    config._attn_implementation = info.get("attn_implementation", "eager")
    model = getattr(transformers, info["model_class"])(config).eval()
    state = load_file(str(base_dir / "model.safetensors"))
    result = model.load_state_dict(state, strict=False)
    tied = _tied_weights(model)  # target -> source
    untied_missing = sorted(set(result.missing_keys) - set(tied))
    assert not untied_missing and not result.unexpected_keys, (
        f"{family}: {base_dir / 'model.safetensors'} does not match transformers {transformers.__version__}'s "
        f"{info['model_class']}: missing {untied_missing}, unexpected {sorted(result.unexpected_keys)}")
    model.tie_weights()
    params = model.state_dict(keep_vars=True)
    for target in result.missing_keys:  # each missing key is a tied copy of a loaded one
        source = tied[target]
        assert source in state, f"{family}: tied {target} <- {source}, but {source} is not in the checkpoint"
        assert params[target].data_ptr() == params[source].data_ptr(), f"{family}: {target} not tied to {source}"
    return model


def _tied_weights(model) -> dict[str, str]:
    tied = getattr(model, "all_tied_weights_keys", None)  # transformers 5: {target: source}, only when tying
    if isinstance(tied, dict):
        return dict(tied)
    # transformers 4: a list of target patterns; the sources are whatever they are tied to after tie_weights()
    out = {}
    if getattr(model.config, "tie_word_embeddings", False):
        params = model.state_dict(keep_vars=True)
        by_ptr = {}
        model.tie_weights()
        for name, p in params.items():
            by_ptr.setdefault(p.data_ptr(), []).append(name)
        for names in by_ptr.values():
            for name in names[1:]:
                out[name] = names[0]
    return out


@functools.lru_cache(maxsize=None)
def base_outputs(family: str) -> dict[str, torch.Tensor]:
    model = load_base(family)
    ids = load_file(str(ROOT / MANIFEST["families"][family]["inputs"]))["input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True, return_dict=True)
    return {"logits": out.logits, "last_hidden_state": out.hidden_states[-1]}


def _adapter_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    if (adapter_dir / "adapter.safetensors").exists():
        return load_file(str(adapter_dir / "adapter.safetensors"))
    return torch.load(adapter_dir / "pytorch_adapter.bin", map_location="cpu", weights_only=True)


def test_manifest_complete():
    versions = MANIFEST["versions"]
    assert versions["adapters"] == "1.3.0" and versions["transformers"].startswith("4.57."), versions
    assert set(MANIFEST["families"]) == {"bert", "gpt2", "llama"}
    presets = {(c["family"], c["config_class"]) for c in CASES}
    for family in MANIFEST["families"]:
        for cls in ("SeqBnConfig", "DoubleSeqBnConfig", "ParBnConfig", "SeqBnInvConfig", "CompacterConfig",
                    "CompacterPlusPlusConfig"):
            assert (family, cls) in presets, f"no {cls} case for {family}"
    for case in SKIPPED:
        assert case["reason"], case
    size = sum(p.stat().st_size for p in ROOT.rglob("*") if p.is_file())
    assert size < 5e6, f"fixtures are {size / 1e6:.1f} MB"


@pytest.mark.parametrize("case", CASES, ids=[c["dir"] for c in CASES])
def test_fixture_case(case):
    for rel in case["files"]:
        assert (ROOT / rel).is_file(), f"{case['dir']}: missing {rel}"
    case_dir = ROOT / case["dir"]

    saved = json.loads((case_dir / "adapter" / "adapter_config.json").read_text())
    assert saved["config"] == case["adapter_config"] and saved["name"] == MANIFEST["adapter_name"]
    for sub in ("adapter", "adapter_safetensors", "adapter_with_head"):
        if (case_dir / sub).exists():
            weights = _adapter_weights(case_dir / sub)
            assert {k: list(v.shape) for k, v in weights.items()} == case["adapter_weights"], sub
            assert all(v.dtype == torch.float32 for v in weights.values())

    expected = load_file(str(case_dir / "expected.safetensors"))
    assert {k: list(v.shape) for k, v in expected.items()} == case["expected"]
    got = base_outputs(case["family"])
    for key in ("logits", "last_hidden_state"):
        torch.testing.assert_close(got[key], expected[f"off.{key}"], rtol=0, atol=ATOL,
                                   msg=lambda m: f"{case['dir']}: base output {key} (adapter off): {m}")
    effect = (expected["on.logits"] - expected["off.logits"]).abs().max().item()
    assert effect > 1e-3, f"{case['dir']}: the stored adapter barely changes the logits ({effect})"


@pytest.mark.parametrize("family", sorted(MANIFEST["families"]))
def test_base_from_pretrained(family):
    """The usual route works too: from_pretrained on the base directory, tied weights and all."""
    info = MANIFEST["families"][family]
    model = getattr(transformers, info["model_class"]).from_pretrained(
        ROOT / info["base_dir"], attn_implementation=info.get("attn_implementation", "eager")).eval()
    ids = load_file(str(ROOT / info["inputs"]))["input_ids"]
    expected = load_file(str(ROOT / f"{family}/seq_bn/expected.safetensors"))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits, expected["off.logits"], rtol=0, atol=ATOL)
