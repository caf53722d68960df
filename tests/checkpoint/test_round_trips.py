"""Save then load, fastpeft to fastpeft, for every method with a checkpoint format: the loaded adapter has the
same parameters bit for bit and the model computes the same outputs (tiny Llama, GPT-2, BERT, T5)."""
from __future__ import annotations

import pytest
import torch

import fastpeft as fp

pytest.importorskip("transformers")
from tests.models.tiny import model, out  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"], "bert": ["query", "value"],
           "t5": ["q", "v", "wo"]}
CONFIGS = {
    "lora": lambda kind: fp.LoRAConfig(r=4, target_modules=TARGETS[kind], init_weights=False, use_rslora=True),
    "dora": lambda kind: fp.LoRAConfig(r=4, target_modules=TARGETS[kind], init_weights=False, use_dora=True),
    "ia3": lambda kind: fp.IA3Config(init_weights=False),
    "adalora": lambda kind: fp.AdaLoRAConfig(init_r=4, target_r=2, total_step=10, target_modules=TARGETS[kind],
                                             init_weights=False),
}


def _adapter_params(m, name):
    return {n: p for n, p in m.named_parameters() if f".{name}" in n and p.requires_grad}


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("kind", list(TARGETS))
def test_save_then_load_is_bit_identical(kind, method, tmp_path):
    torch.manual_seed(0)
    m = model(kind)
    fp.add_adapter(m, "a", CONFIGS[method](kind))
    fp.save_adapter(m, tmp_path, "a")
    loaded = model(kind)
    fp.load_adapter(loaded, tmp_path, name="a")
    assert type(fp.adapters(loaded)["a"]) is type(fp.adapters(m)["a"])
    mine, theirs = _adapter_params(m, "a"), _adapter_params(loaded, "a")
    assert mine.keys() == theirs.keys() and mine
    for key, value in mine.items():
        assert torch.equal(value, theirs[key]), key
    assert torch.equal(out(loaded), out(m))
