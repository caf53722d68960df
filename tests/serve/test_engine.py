"""The engine in-process: per-token adapter routing on transformers' continuous batching gives every request what
offline generate gives with only its adapter active (greedy, token for token), and adapter rules."""
from __future__ import annotations

import threading

import pytest

import fastpeft as fp
from fastpeft.serve import Engine, Rejected, SamplingParams, generate_many

from .conftest import ADAPTERS, encode

PROMPTS = ["The keeper ", "Lighthouse at night, the", "a", "Zebra crossing 42"]


def test_generate_many_matches_offline_generate_per_adapter(reference):
    model = reference.model
    jobs = [(encode(p), name) for i, p in enumerate(PROMPTS) for name in [None, "__base__", *ADAPTERS][i::2]]
    assert len({name for _, name in jobs}) >= 6  # several adapters (and none) share the scheduler's steps
    got = generate_many(model, jobs, max_new_tokens=6)
    for (prompt, name), tokens in zip(jobs, got):
        assert tokens == reference(prompt, name, 6), f"adapter {name!r}, prompt {prompt}"
    answers = {name: tokens for (prompt, name), tokens in zip(jobs, got) if prompt == jobs[0][0]}
    assert len({tuple(t) for t in answers.values()}) > 1  # adapters do change the answer


def test_generate_many_with_a_tokenizer_and_sampling_seed(reference, served):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(served["model"])
    jobs = [("Hello", "lora4"), ("Hello", "lora4")]
    sampled = SamplingParams(temperature=0.9, top_p=0.9, seed=7)
    a = generate_many(reference.model, jobs, max_new_tokens=5, tokenizer=tok, sampling=sampled)
    assert isinstance(a[0], str) and a[0] == a[1]  # the same seed, the same draw, whatever the batch mixes


def test_prefix_tuning_is_refused_with_a_clear_message(reference, tmp_path):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(reference.model.name_or_path)
    fp.add_adapter(base, "p", fp.PrefixTuningConfig(prefix_length=2))
    fp.save_adapter(base, str(tmp_path / "p"), "p")
    fp.delete_adapter(base, "p")
    engine = Engine(base)
    with pytest.raises(Rejected, match="PrefixTuningConfig.*LoRA") as info:
        engine.load_adapter("p", str(tmp_path / "p"))
    assert info.value.status == 422
    assert "p" not in engine.adapters  # refused before the engine served anything with it


def test_unload_waits_for_the_adapters_requests_and_refuses_new_ones(reference, served):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(served["model"]).eval()
    done = {}
    with Engine(model, max_queue=8) as engine:
        engine.load_adapter("lora4", served["adapters"]["lora4"])
        finished = threading.Event()

        def keep(out):
            if out.finished:
                done["out"] = out
                finished.set()
        engine.submit(encode("The keeper "), "lora4", SamplingParams(max_tokens=40), keep, ignore_eos=True)
        unloading = threading.Thread(target=engine.unload_adapter, args=("lora4",))
        unloading.start()
        while "lora4" in engine.adapters:
            pass
        with pytest.raises(Rejected, match="no adapter named 'lora4'") as info:  # refused cleanly while draining
            engine.submit(encode("x"), "lora4", SamplingParams(max_tokens=2), keep)
        assert info.value.status == 404
        unloading.join(timeout=60)
        assert finished.is_set() and done["out"].error is None
    expected = reference(encode("The keeper "), "lora4", 40)  # stops at EOS; the request ignored it
    assert len(done["out"].tokens) == 40 and done["out"].tokens[:len(expected)] == expected
    assert "lora4" not in fp.adapters(model)
