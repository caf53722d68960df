"""Public calls given a wrapped model, in one process: torch.compile's OptimizedModule, DataParallel and the two
nested; a wrapper is never mistaken for a model without adapters. DDP and FSDP2 need real process groups:
test_multiprocess.py. Also: a save never reads a tensor whose storage is gone (FSDP frees unsharded parameters
when it reshards; reading one killed the interpreter)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import fastpeft as fp
from fastpeft.inject.swap import wrappers
from tests.models.tiny import assert_same_state, model, out, snapshot, trainable

WRAPPERS = {"compile": lambda m: torch.compile(m, backend="eager"),
            "DataParallel": nn.DataParallel,
            "compile(DataParallel)": lambda m: torch.compile(nn.DataParallel(m), backend="eager")}
LORA = fp.LoRAConfig(r=4, target_modules=["q_proj", "v_proj"])
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("wrap", list(WRAPPERS.values()), ids=list(WRAPPERS))
def test_public_calls_take_the_wrapped_model(wrap, tmp_path):
    m = model()
    frozen = snapshot(m)
    w = wrap(m)
    assert fp.add_adapter(w, "a", LORA) is w
    assert fp.add_adapter(w, "b", LORA) is w
    assert list(fp.adapters(w)) == ["a", "b"] and fp.adapter_ids(w) == {"a": 0, "b": 1}
    fp.set_active_adapters(w, ["a", "b"])
    assert any(".b" in n for n in trainable(m)) and fp.trainable_parameters(w) == fp.trainable_parameters(m)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_()
    with fp.disable_adapters(w):
        assert all(layer.disabled for _, layer in wrappers(m))
    with fp.adapter_batch(w, ["a", None]) as batch:
        assert batch is not None
    before = snapshot(m)
    assert fp.merge_adapter(w, "a") is w
    assert fp.unmerge_adapter(w) is w
    assert_same_state(m, before)
    fp.save_adapter(w, tmp_path / "a", "a")
    fresh = model()
    fw = wrap(fresh)
    assert fp.load_adapter(fw, tmp_path / "a", name="a") is fw
    fp.set_active_adapters(w, "a")
    assert torch.equal(out(fresh), out(m))
    assert fp.delete_adapter(w, "b") is w and list(fp.adapters(w)) == ["a"]
    assert fp.unload(w) is m and fp.adapters(w) == {}
    assert_same_state(m, frozen)


def test_eject_and_rank_allocator_take_the_compiled_model():
    m = model()
    w = torch.compile(m, backend="eager")
    fp.add_adapter(w, "p", fp.PrefixTuningConfig(prefix_length=3, bottleneck_size=8))
    assert list(fp.adapters(m)) == ["p"]  # the adapter lives on the model, under the model's own module paths
    logits = out(m)
    assert fp.eject_prefix_tuning(w, "p") is w and fp.adapters(w)["p"].flat
    assert torch.allclose(out(m), logits, atol=1e-5)
    fp.delete_adapter(w, "p")
    fp.add_adapter(w, "a", fp.AdaLoRAConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj"]))
    allocator = fp.RankAllocator(w, "a")
    m(input_ids=torch.randint(3, 100, (1, 6))).logits.sum().backward()
    assert allocator.update_and_allocate(w, 0) == allocator.init_budget


@pytest.mark.parametrize("call", [
    lambda: fp.add_adapter("model.safetensors", "a", LORA),
    lambda: fp.adapters(None),
    lambda: fp.save_adapter({"weight": torch.zeros(1)}, "out"),
], ids=["add_adapter(str)", "adapters(None)", "save_adapter(dict)"])
def test_not_a_model_is_named(call):
    with pytest.raises(fp.AdapterError, match="expected a torch.nn.Module"):
        call()


FREED = """
import os, sys, torch, fastpeft as fp
model = torch.nn.Sequential(torch.nn.Linear(4, 4))
fp.add_adapter(model, "a", fp.LoRAConfig(r=2, target_modules=["0"]))
model[0].lora_A["a"].untyped_storage().resize_(0)
try:
    fp.save_adapter(model, sys.argv[1], "a")
except fp.CheckpointError as exc:
    assert "lost its data" in str(exc) and not os.path.exists(sys.argv[1]), exc
else:
    raise AssertionError("saved")
"""


def test_save_refuses_a_tensor_whose_storage_is_gone(tmp_path):
    """What FSDP2 leaves behind when it reshards an unsharded parameter a save still holds: reading it reads freed
    memory (the interpreter died with SIGSEGV). The save must raise instead, and write nothing. In a child process,
    so that a regression fails this test rather than ending the test session."""
    proc = subprocess.run([sys.executable, "-c", FREED, str(tmp_path / "a")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
