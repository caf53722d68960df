"""What runs during a forward: inject/ plans, attaches and undoes, and is never called back while a model computes.

Every method that hooks into a model (LoRA, IA3, AdaLoRA's penalty, bottleneck and invertible adapters, prefix
tuning with gating and shifted positions, LLaMA-Adapter, prompt tuning, multi-adapter batches through
adapter_names=) runs its per-call logic in modules/ and ops/. A profiler records every Python function a forward,
a backward and a generate call; none may come from fastpeft/inject.
"""
from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
import torch

import fastpeft as fp
from tests.models.tiny import IDS, batch, model

INJECT = str(Path(fp.__file__).parent / "inject")


def _files_called(run) -> set[str]:
    """The source files of every Python function `run` calls (this thread)."""
    files: set[str] = set()

    def profile(frame, event, arg):
        if event == "call":
            files.add(frame.f_code.co_filename)

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return files


def _assert_inject_not_called(run) -> None:
    called = sorted(f for f in _files_called(run) if f.startswith(INJECT))
    assert not called, f"a forward called back into the injection layer: {called}"


def _llama_with_everything():
    m = model("llama")
    fp.add_adapter(m, "lora", fp.LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False))
    fp.add_adapter(m, "ia3", fp.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    fp.add_adapter(m, "ada", fp.AdaLoRAConfig(init_r=4, target_r=2, target_modules=["o_proj"], total_step=10,
                                              init_weights=False))
    fp.add_adapter(m, "bn", fp.SeqBnInvConfig(reduction_factor=4))
    fp.add_adapter(m, "prefix", fp.PrefixTuningConfig(prefix_length=3, use_gating=True, shift_positions=True))
    fp.add_adapter(m, "llama", fp.LlamaAdapterConfig(adapter_len=2))
    fp.add_adapter(m, "prompt", fp.PromptTuningConfig(prompt_length=2))
    fp.set_active_adapters(m, ["lora", "ia3", "ada", "bn", "prefix", "llama", "prompt"])
    return m


def test_forward_backward_generate_never_call_inject():
    m = _llama_with_everything().train()

    def step():
        out = m(**batch(m))
        out.loss.backward()

    _assert_inject_not_called(step)
    m.eval()
    _assert_inject_not_called(lambda: m.generate(IDS, max_new_tokens=3, do_sample=False))


def test_multi_adapter_batches_never_call_inject():
    m = _llama_with_everything().eval()
    names = ["lora", "prefix", "llama", "ia3", "__base__"]
    ids = torch.randint(3, 100, (len(names), 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _assert_inject_not_called(lambda: m(input_ids=ids, adapter_names=names))
        _assert_inject_not_called(lambda: m.generate(ids, adapter_names=names, max_new_tokens=2, do_sample=False))


@pytest.mark.parametrize("kind", ["roberta", "t5"])
def test_family_position_rules_never_call_inject(kind):
    """RoBERTa's positions counted from padding and T5's relative position bias: rules of the family table, run by
    modules/prefix.py."""
    m = model(kind)
    fp.add_adapter(m, "p", fp.PrefixTuningConfig(prefix_length=3, shift_positions=True))
    with torch.no_grad():
        _assert_inject_not_called(lambda: m(**{k: v for k, v in batch(m).items()}))


def test_two_threads_never_see_each_others_batch():
    """Two threads run one model at the same time, each inside its own fp.adapter_batch: every row gets its own
    thread's adapter (the batch is per thread), and a third thread without a batch runs the active adapters."""
    m = model("llama")
    for name in ("a", "b"):
        fp.add_adapter(m, name, fp.LoRAConfig(r=4, init_weights=False))
    fp.set_active_adapters(m, "a")
    ids = IDS
    with torch.no_grad():
        expected = {}
        for name in ("a", "b"):
            fp.set_active_adapters(m, name)
            expected[name] = m(input_ids=ids).logits
        fp.set_active_adapters(m, "a")
        assert (expected["a"] - expected["b"]).abs().max() > 1e-3
    barrier = threading.Barrier(3)
    results, errors = {}, []

    def serve(key, rows):
        try:
            with torch.no_grad():
                if rows is None:
                    barrier.wait()
                    for _ in range(3):
                        results[key] = m(input_ids=ids).logits
                    barrier.wait()
                    return
                with fp.adapter_batch(m, rows):
                    barrier.wait()  # all three threads are inside their blocks before any forward runs
                    for _ in range(3):
                        results[key] = m(input_ids=ids).logits
                    barrier.wait()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=serve, args=("b", ["b", "b"])),
               threading.Thread(target=serve, args=("mixed", ["a", "b"])),
               threading.Thread(target=serve, args=("active", None))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    torch.testing.assert_close(results["b"], expected["b"])
    torch.testing.assert_close(results["mixed"][0], expected["a"][0])
    torch.testing.assert_close(results["mixed"][1], expected["b"][1])
    torch.testing.assert_close(results["active"], expected["a"])


def test_two_threads_never_see_each_others_adapter_names():
    """adapter_names= in two threads at once: each call's batch ends with its call, in its own thread."""
    m = model("llama")
    for name in ("a", "b"):
        fp.add_adapter(m, name, fp.LoRAConfig(r=4, init_weights=False))
    with torch.no_grad():
        want = {n: m(input_ids=IDS, adapter_names=[n, n]).logits for n in ("a", "b")}
    barrier, results, errors = threading.Barrier(2), {}, []

    def run(name):
        try:
            barrier.wait()
            with torch.no_grad():
                for _ in range(4):
                    results[name] = m(input_ids=IDS, adapter_names=[name, name]).logits
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for name in ("a", "b"):
        torch.testing.assert_close(results[name], want[name])
    assert fp.inject.state.get_state(m).batch.current is None
