"""DDP and FSDP2 with real torch.distributed processes: two ranks on gloo (CPU), started as torchrun starts them.

The two ranks (worker.py) load a LoRA and a prefix-tuning adapter into a tiny Llama, wrap it (DDP, or FSDP2's
fully_shard on every decoder layer and the root), train a few SGD steps on their halves of the same global batches,
and save through fastpeft's public calls. Meanwhile this process trains the same adapters alone on the whole
batches. The checks: the trained parameters agree, a sharded save is byte for byte a single-process save of the
same weights (also after model.unshard(), which used to kill the interpreter), the files reload, a merge after
gathering gives the single-process merged model, and the public calls take the wrappers or refuse with the fix.
"""
from __future__ import annotations

import json
import os
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastpeft as fp
from tests.distributed.common import CONFIGS, TIMEOUT, WORLD, base, build, finish_ranks, logits, start_ranks, train

pytestmark = pytest.mark.slow  # ~15 s on 2 cores: two ranks and the single-process references, started once


def _reference(out: str, method: str) -> torch.nn.Module:
    """The same training in one process on the whole batches; saved to ref_<method>/."""
    model = base(os.path.join(out, "base.safetensors"))
    fp.load_adapter(model, os.path.join(out, f"init_{method}"))
    train(model, None)
    fp.save_adapter(model, os.path.join(out, f"ref_{method}"))
    return model


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("distributed"))
    torch.manual_seed(3)
    save_file(build().state_dict(), os.path.join(out, "base.safetensors"))
    for method, config in CONFIGS.items():  # starting adapters with every parameter random (LoRA's B too)
        model = base(os.path.join(out, "base.safetensors"))
        fp.add_adapter(model, "default", config())
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p), alpha=0.1)
        fp.save_adapter(model, os.path.join(out, f"init_{method}"))
    procs = start_ranks(out, "tests.distributed.worker")
    try:  # the single-process runs, while the ranks run
        reference = {method: _reference(out, method) for method in CONFIGS}
        merged = base(os.path.join(out, "base.safetensors"))
        fp.load_adapter(merged, os.path.join(out, "ref_lora"))
        fp.merge_adapter(merged, "default")
        merged_logits = logits(merged)
    finally:
        problems = finish_ranks(procs, time.monotonic() + TIMEOUT)
    if problems:
        pytest.fail("the two ranks did not finish:\n" + "\n".join(problems))
    results = {}
    for rank in range(WORLD):
        with open(os.path.join(out, f"rank{rank}.json")) as f:
            results[rank] = json.load(f)
    return {"out": out, "reference": reference, "merged_logits": merged_logits, "results": results}


def _weights(directory: str) -> dict[str, torch.Tensor]:
    """The tensors of the checkpoint in `directory` (PEFT's or AdapterHub's file name)."""
    (name,) = [n for n in os.listdir(directory) if n.endswith(".safetensors")]
    return load_file(os.path.join(directory, name))


def _files(directory: str) -> dict[str, bytes]:
    files = {}
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            files[name] = f.read()
    return files


def test_every_scenario_and_check_passes_on_both_ranks(runs):
    failed = {f"rank {rank}: {name}": text for rank, results in runs["results"].items()
              for name, text in results.items() if text != "ok"}
    assert not failed, "\n".join(f"{k}\n{v}" for k, v in failed.items())
    for results in runs["results"].values():  # every scenario ran to its end on both ranks
        assert {"ddp lora", "ddp prefix", "fsdp lora", "fsdp prefix", "fsdp unshard", "accelerate"} <= set(results)
        assert len(results) >= 23


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_training_matches_single_process(runs, wrapper, method):
    out = runs["out"]
    got, want = _weights(os.path.join(out, f"{wrapper}_{method}")), _weights(os.path.join(out, f"ref_{method}"))
    start = _weights(os.path.join(out, f"init_{method}"))
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert torch.allclose(got[key], value, rtol=1e-4, atol=1e-6), (key, (got[key] - value).abs().max())
    assert any(not torch.allclose(want[k], start[k]) for k in want)  # the training moved the adapter


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_saved_adapter_reloads(runs, wrapper, method):
    out = runs["out"]
    model = base(os.path.join(out, "base.safetensors"))
    fp.load_adapter(model, os.path.join(out, f"{wrapper}_{method}"))
    assert torch.allclose(logits(model), logits(runs["reference"][method]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_sharded_save_is_the_single_process_save(runs, method):
    """Saved from the sharded model before training: the very files the single process wrote for those weights."""
    out = runs["out"]
    assert _files(os.path.join(out, f"fsdp_{method}_init")) == _files(os.path.join(out, f"init_{method}"))


def test_save_after_unshard(runs):
    """FSDP2 on the root alone, saved after model.unshard(): this killed the interpreter (SIGSEGV)."""
    out = runs["out"]
    assert _files(os.path.join(out, "fsdp_unshard")) == _files(os.path.join(out, "init_lora"))


def test_save_through_accelerate(runs):
    out = runs["out"]
    assert _files(os.path.join(out, "accelerate")) == _files(os.path.join(out, "init_lora"))


def test_merge_after_gathering(runs):
    """Trained sharded, saved (gathered), loaded into an unsharded base and merged: the single-process merge."""
    got = load_file(os.path.join(runs["out"], "fsdp_lora_merged.safetensors"))["logits"]
    assert torch.allclose(got, runs["merged_logits"], rtol=1e-4, atol=1e-5)
