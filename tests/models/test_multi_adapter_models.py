"""Multi-adapter batches on tiny models: every row equals the model run on that row alone with only its adapter
active (isolation), for LoRA of ranks 1..64, IA3, LoRA and IA3 on one layer, duplicates, all rows on one adapter
or none; generate with adapter_names equals per-row generation; training routes each row's gradient to its own
adapter; adapters added and removed while loaded; errors leave the model unchanged. CPU reference path, and the
Triton kernels under the interpreter (FASTPEFT_BACKEND=triton)."""
from __future__ import annotations

import pytest
import torch

import fastpeft as fp
from fastpeft.ops import use_backend
from tests.harness import needs_triton
from tests.models import tiny

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _mixed(kind: str = "llama"):
    """LoRA adapters of ranks 1, 4, 16 and 64 (random B: they change the output), an IA3 adapter (k, v, down:
    nested around LoRA on v_proj), all on one model."""
    m = tiny.model(kind)
    torch.manual_seed(3)
    targets = None if kind != "llama" else ALL_LINEAR
    for name, r in (("r1", 1), ("r4", 4), ("r16", 16), ("r64", 64)):
        fp.add_adapter(m, name, fp.LoRAConfig(r=r, alpha=2 * r, init_weights=False, target_modules=targets))
    fp.add_adapter(m, "ia3", fp.IA3Config(init_weights=False))
    return m


def _alone(m, ids: torch.Tensor, name: str | None) -> torch.Tensor:
    """Row logits with only `name` active (None: the base model)."""
    if name is None:
        with fp.disable_adapters(m):
            return tiny.out(m, ids)
    fp.set_active_adapters(m, name)
    return tiny.out(m, ids)


def _assert_isolated(m, ids, names, tol=1e-5):
    with torch.no_grad():
        batched = m(input_ids=ids, adapter_names=names).logits
    for i, name in enumerate(names):
        alone = _alone(m, ids[i:i + 1], None if name in (None, "__base__") else name)
        torch.testing.assert_close(batched[i:i + 1], alone, rtol=tol, atol=tol, msg=f"row {i} ({name})")


IDS = torch.randint(3, tiny.VOCAB, (7, 6), generator=torch.Generator().manual_seed(5))
NAMES = ["r4", None, "r64", "ia3", "r4", "__base__", "r1"]


def test_rows_are_isolated_reference():
    m = _mixed()
    assert any(isinstance(mod, fp.modules.IA3Linear) and mod.wraps_adapters for _, mod in m.named_modules())
    _assert_isolated(m, IDS, NAMES)
    _assert_isolated(m, IDS[:3], ["r16", "r16", "r16"])
    _assert_isolated(m, IDS[:2], [None, None])


@needs_triton
def test_rows_are_isolated_triton_kernels():
    m = _mixed()
    with use_backend("triton"):
        with torch.no_grad():
            batched = m(input_ids=IDS, adapter_names=NAMES).logits
    for i, name in enumerate(NAMES):
        alone = _alone(m, IDS[i:i + 1], None if name in (None, "__base__") else name)
        torch.testing.assert_close(batched[i:i + 1], alone, rtol=1e-4, atol=1e-4, msg=f"row {i} ({name})")


@pytest.mark.parametrize("kind", ["gpt2", "bert", "t5"])
def test_other_families(kind):
    m = _mixed(kind)
    names = ["r4", None, "ia3", "r64"]
    with torch.no_grad():
        if kind == "t5":
            batched = m(input_ids=IDS[:4], decoder_input_ids=IDS[:4, :3], adapter_names=names).logits
        else:
            batched = m(input_ids=IDS[:4], adapter_names=names).logits
    for i, name in enumerate(names):
        if name is None:
            ctx = fp.disable_adapters(m)
        else:
            fp.set_active_adapters(m, name)
            ctx = torch.no_grad()
        with ctx, torch.no_grad():
            if kind == "t5":
                alone = m(input_ids=IDS[i:i + 1], decoder_input_ids=IDS[i:i + 1, :3]).logits
            else:
                alone = m(input_ids=IDS[i:i + 1]).logits
        torch.testing.assert_close(batched[i:i + 1], alone, rtol=1e-5, atol=1e-5)


def test_index_tensor_form_and_ids():
    m = _mixed()
    ids = fp.adapter_ids(m)
    assert sorted(ids) == ["ia3", "r1", "r16", "r4", "r64"] and len(set(ids.values())) == 5
    index = torch.tensor([ids[n] if n not in (None, "__base__") else -1 for n in NAMES])
    with torch.no_grad(), fp.adapter_batch(m, index):
        batched = m(input_ids=IDS).logits
    with torch.no_grad():
        by_name = m(input_ids=IDS, adapter_names=NAMES).logits
    torch.testing.assert_close(batched, by_name, rtol=0, atol=0)


def test_generate_with_adapter_names_matches_each_row_alone():
    m = _mixed()
    prompt = IDS[:4, :4]
    names = ["r16", None, "ia3", "r1"]
    out = m.generate(input_ids=prompt, adapter_names=names, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    for i, name in enumerate(names):
        if name is None:
            with fp.disable_adapters(m):
                alone = m.generate(input_ids=prompt[i:i + 1], max_new_tokens=5, min_new_tokens=5, do_sample=False)
        else:
            fp.set_active_adapters(m, name)
            alone = m.generate(input_ids=prompt[i:i + 1], max_new_tokens=5, min_new_tokens=5, do_sample=False)
        assert torch.equal(out[i:i + 1], alone), (i, name)


def test_generate_with_beams_repeats_each_rows_adapter():
    m = _mixed()
    prompt = IDS[:2, :4]
    out = m.generate(input_ids=prompt, adapter_names=["r4", "ia3"], max_new_tokens=3, min_new_tokens=3, num_beams=2,
                     do_sample=False)
    fp.set_active_adapters(m, "ia3")
    alone = m.generate(input_ids=prompt[1:], max_new_tokens=3, min_new_tokens=3, num_beams=2, do_sample=False)
    assert torch.equal(out[1:], alone)


def test_training_routes_gradients_to_each_rows_adapter():
    m = _mixed()
    fp.set_active_adapters(m, ["r4", "r16", "ia3", "r1", "r64"])  # trainable
    names = ["r4", "ia3", "r4", None]
    loss = m(input_ids=IDS[:4], labels=IDS[:4], adapter_names=names).loss
    loss.backward()
    grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
    for n, g in grads.items():
        used = any(f".{a}" in n for a in ("r4", "ia3"))
        assert (g is not None and g.abs().sum() > 0) == used, n
    # the batch's gradient of each adapter = the sum of its rows' gradients run alone
    m.zero_grad()
    total = {}
    for i, name in enumerate(names):
        fp.set_active_adapters(m, ["r4", "r16", "ia3", "r1", "r64"])
        if name is None:
            continue
        m.zero_grad()
        with fp.adapter_batch(m, [name]):
            out = m(input_ids=IDS[i:i + 1], labels=IDS[i:i + 1])
        # the batched loss is the mean over 4 rows' tokens: row i's share is its own mean loss / 4
        (out.loss / 4).backward()
        for n, p in m.named_parameters():
            if p.grad is not None:
                total[n] = total.get(n, 0) + p.grad.clone()
    for n, g in total.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_adapters_added_and_removed_while_loaded():
    m = _mixed()
    before = fp.adapter_ids(m)
    fp.delete_adapter(m, "r16")
    fp.add_adapter(m, "new", fp.LoRAConfig(r=8, init_weights=False, target_modules=["q_proj"]))
    ids = fp.adapter_ids(m)
    assert all(ids[n] == before[n] for n in ("r1", "r4", "r64", "ia3"))
    assert ids["new"] == before["r16"]  # the freed id is reused, and nothing of r16 stays in its slot
    _assert_isolated(m, IDS[:4], ["new", "r4", None, "ia3"])


def test_errors_leave_the_model_unchanged():
    m = _mixed()
    before = tiny.snapshot(m)
    with pytest.raises(fp.AdapterError, match="no adapter named 'nope'"):
        m(input_ids=IDS[:2], adapter_names=["r4", "nope"])
    with pytest.raises(fp.AdapterError, match="one per row"):
        m(input_ids=IDS[:3], adapter_names=["r4", "r1"])
    with pytest.raises(fp.AdapterError, match="names no adapter"):
        with fp.adapter_batch(m, torch.tensor([0, 99])):
            pass
    tiny.assert_same_state(m, before)
    # after the errors the model runs batches as before
    _assert_isolated(m, IDS[:2], ["r4", "ia3"])
    lora_only = tiny.model()
    for name in ("a", "b"):
        fp.add_adapter(lora_only, name, fp.LoRAConfig(r=2, init_weights=False))
    fp.merge_adapter(lora_only, "a")
    with pytest.raises(fp.AdapterError, match="unmerge"):
        lora_only(input_ids=IDS[:2], adapter_names=["a", "b"])


def test_unsupported_methods_are_refused():
    m = tiny.model("llama")
    fp.add_adapter(m, "bn", fp.SeqBnConfig(reduction_factor=4))
    with pytest.raises(fp.AdapterError, match="multi-adapter batches take"):
        m(input_ids=IDS[:1], adapter_names=["bn"])


def test_nested_lora_and_ia3_layer_lifecycle():
    """LoRA and IA3 on one layer: add either first, save/load both, delete and unload restore the base exactly."""
    m = tiny.model("llama")
    before = tiny.snapshot(m)
    base = tiny.out(m)
    fp.add_adapter(m, "ia3", fp.IA3Config(init_weights=False))
    fp.add_adapter(m, "lora", fp.LoRAConfig(r=4, init_weights=False))
    v = m.model.layers[0].self_attn.v_proj
    assert isinstance(v, fp.modules.IA3Linear) and isinstance(v.base_layer, fp.modules.LoRALinear)
    fp.set_active_adapters(m, ["lora", "ia3"])
    both = tiny.out(m)
    fp.set_active_adapters(m, "lora")
    lora_only = tiny.out(m)
    assert not torch.allclose(both, lora_only)
    with pytest.raises(fp.AdapterError, match="both LoRA and IA3"):
        fp.merge_adapter(m, "lora")
    fp.delete_adapter(m, "ia3")
    assert isinstance(m.model.layers[0].self_attn.v_proj, fp.modules.LoRALinear)
    torch.testing.assert_close(tiny.out(m), lora_only)
    fp.add_adapter(m, "ia3", fp.IA3Config(init_weights=False))
    fp.delete_adapter(m, "lora")
    assert type(m.model.layers[0].self_attn.v_proj).__name__ == "IA3Linear"
    fp.unload(m)
    tiny.assert_same_state(m, before)
    torch.testing.assert_close(tiny.out(m), base)


def _attention_mix(kind: str = "llama"):
    """Two prefix-tuning adapters of different lengths (one gated), a LLaMA-Adapter (gates made non-zero) and a
    LoRA adapter on one model."""
    m = tiny.model(kind)
    torch.manual_seed(4)
    fp.add_adapter(m, "p3", fp.PrefixTuningConfig(prefix_length=3, bottleneck_size=16))
    fp.add_adapter(m, "p5", fp.PrefixTuningConfig(prefix_length=5, flat=True, shift_positions=True))
    if kind == "llama":
        fp.add_adapter(m, "gated", fp.PrefixTuningConfig(prefix_length=2, flat=True, use_gating=True))
        fp.add_adapter(m, "llama", fp.LlamaAdapterConfig(adapter_len=4, adapter_layers=2))
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "adaption_gate" in n:
                    p.fill_(0.7)
    fp.add_adapter(m, "lora", fp.LoRAConfig(r=4, init_weights=False))
    return m


def test_prefix_and_llama_adapter_rows_are_isolated():
    m = _attention_mix()
    names = ["p3", "llama", None, "p5", "lora", "gated", "p3"]
    _assert_isolated(m, IDS, names)


@pytest.mark.parametrize("kind", ["gpt2", "bert", "t5"])
def test_prefix_rows_other_families(kind):
    m = _attention_mix(kind)
    names = ["p3", None, "p5", "lora"]
    with torch.no_grad():
        extra = {"decoder_input_ids": IDS[:4, :3]} if kind == "t5" else {}
        if kind == "t5":  # PEFT's T5 layout (shift_positions) is refused in batches: p5 runs alone below
            names = ["p3", None, "lora", "p3"]
        batched = m(input_ids=IDS[:4], adapter_names=names, **extra).logits
    for i, name in enumerate(names):
        extra = {"decoder_input_ids": IDS[i:i + 1, :3]} if kind == "t5" else {}
        if name is None:
            with fp.disable_adapters(m), torch.no_grad():
                alone = m(input_ids=IDS[i:i + 1], **extra).logits
        else:
            fp.set_active_adapters(m, name)
            with torch.no_grad():
                alone = m(input_ids=IDS[i:i + 1], **extra).logits
        torch.testing.assert_close(batched[i:i + 1], alone, rtol=1e-5, atol=1e-5, msg=f"{kind} row {i} ({name})")


@needs_triton
def test_prefix_rows_triton_kernels():
    m = tiny.model("llama")
    torch.manual_seed(4)
    # head dim 8 runs the reference; the kernels take 64..128: a wider tiny model
    m = type(m)(type(m.config)(**{**m.config.to_dict(), "hidden_size": 128, "num_attention_heads": 2,
                                  "num_key_value_heads": 1, "head_dim": 64})).eval()
    fp.add_adapter(m, "p3", fp.PrefixTuningConfig(prefix_length=3, flat=True))
    fp.add_adapter(m, "p5", fp.PrefixTuningConfig(prefix_length=5, flat=True))
    names = ["p5", None, "p3", "p5"]
    with use_backend("triton"), torch.no_grad():
        batched = m(input_ids=IDS[:4], adapter_names=names).logits
    for i, name in enumerate(names):
        alone = _alone(m, IDS[i:i + 1], name)
        torch.testing.assert_close(batched[i:i + 1], alone, rtol=1e-4, atol=1e-4, msg=f"row {i} ({name})")


def test_prefix_generate_and_training():
    m = _attention_mix()
    prompt = IDS[:3, :4]
    names = ["p5", "llama", "p3"]
    out = m.generate(input_ids=prompt, adapter_names=names, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    for i, name in enumerate(names):
        fp.set_active_adapters(m, name)
        alone = m.generate(input_ids=prompt[i:i + 1], max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert torch.equal(out[i:i + 1], alone), (i, name)
    fp.set_active_adapters(m, ["p3", "p5", "llama", "gated", "lora"])
    m(input_ids=IDS[:3], labels=IDS[:3], adapter_names=["p5", "llama", None]).loss.backward()
    for n, p in m.named_parameters():
        if p.requires_grad:
            used = any(f".{a}." in n for a in ("p5", "llama"))
            assert (p.grad is not None and p.grad.abs().sum() > 0) == used, n


def test_a_thousand_adapters_on_a_7b_shaped_model_take_their_own_size():
    """1,000 rank-8/16/64 adapters on Llama-7B's q and v projections (meta device: shapes, no memory): every
    adapter is exactly r·(K + N) numbers per layer, nothing is padded to the largest rank, and adding stays cheap."""
    import time

    import transformers

    config = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        m = transformers.LlamaForCausalLM(config)
    ranks = [(8, 16, 64)[i % 3] for i in range(1000)]
    start = time.perf_counter()
    for i, r in enumerate(ranks):
        fp.add_adapter(m, f"a{i}", fp.LoRAConfig(r=r, target_modules=["q_proj", "v_proj"]))
    elapsed = time.perf_counter() - start
    adapter = sum(p.numel() for n, p in m.named_parameters() if ".lora_" in n)
    assert adapter == sum(ranks) * (4096 + 4096) * 2 * 32
    assert len(fp.adapter_ids(m)) == 1000 and sorted(fp.adapter_ids(m).values()) == list(range(1000))
    assert elapsed < 120, f"adding 1000 adapters took {elapsed:.0f} s"


def test_hundreds_of_adapters_of_mixed_ranks_in_one_batch():
    m = tiny.model("llama")
    torch.manual_seed(6)
    ranks = [1 + (7 * i) % 64 for i in range(300)]
    for i, r in enumerate(ranks):
        fp.add_adapter(m, f"a{i}", fp.LoRAConfig(r=r, init_weights=False, target_modules=["q_proj", "down_proj"]))
    names = ["a299", "a0", None, "a150", "a7", "a150", "a64"]
    _assert_isolated(m, IDS, names)
    layer = m.model.layers[0].self_attn.q_proj
    bank = layer._tables.bank
    assert bank.num_slots == 300 and bank.ranks_host == ranks
    assert all(bank.a[i] is layer.lora_A[f"a{i}"] for i in range(300))  # the parameters themselves: no copies


def test_generate_needs_one_name_per_input_row():
    """Two names for four rows used to run a, a, b, b (another tenant's adapter on a row): an error naming both
    counts, before anything runs; beams and return sequences still repeat each row's own."""
    m = _mixed()
    before = tiny.snapshot(m)
    prompt = IDS[:4, :4]
    for names in (["r4", "ia3"], ["r4"] * 5, torch.tensor([0, 1])):
        with pytest.raises(fp.AdapterError, match=rf"{len(names)} adapter name\(s\) for 4 input row\(s\)"):
            m.generate(input_ids=prompt, adapter_names=names, max_new_tokens=2)
    with pytest.raises(fp.AdapterError, match=r"2 adapter name\(s\) for 3 input row\(s\)"):
        m(input_ids=IDS[:3], adapter_names=["r4", "r1"])
    tiny.assert_same_state(m, before)
    out = m.generate(input_ids=prompt[:2], adapter_names=["r4", "ia3"], max_new_tokens=2, min_new_tokens=2,
                     num_return_sequences=2, do_sample=True, top_k=1)
    assert out.shape[0] == 4


@pytest.mark.parametrize("index, match", [
    (torch.tensor([[0, 1]]), "1-D integer tensor"),
    (torch.tensor([0.0, 1.0]), "1-D integer tensor"),
    (torch.tensor([True, False]), "1-D integer tensor"),
    (torch.tensor([0, -2]), "names no adapter"),
    (torch.tensor([], dtype=torch.int64), "no rows"),
])
def test_adapter_batch_id_tensors_are_checked(index, match):
    m = _mixed()
    with pytest.raises(fp.AdapterError, match=match):
        with fp.adapter_batch(m, index):
            pass


def test_adapter_batch_takes_int32_and_int64_ids():
    m = _mixed()
    ids = fp.adapter_ids(m)
    rows = [ids["r4"], -1, ids["ia3"]]
    with torch.no_grad():
        want = m(input_ids=IDS[:3], adapter_names=["r4", None, "ia3"]).logits
        for dtype in (torch.int32, torch.int64):
            with fp.adapter_batch(m, torch.tensor(rows, dtype=dtype)):
                torch.testing.assert_close(m(input_ids=IDS[:3]).logits, want, rtol=0, atol=0)


def test_the_base_model_takes_adapter_names_too():
    """model.model(..., adapter_names=...) (the base model called alone) routes rows as the full model does instead
    of transformers swallowing the keyword."""
    m = _mixed()
    names = ["r16", None, "ia3"]
    with torch.no_grad():
        hidden = m.model(input_ids=IDS[:3], adapter_names=names).last_hidden_state
        for i, name in enumerate(names):
            if name is None:
                with fp.disable_adapters(m):
                    alone = m.model(input_ids=IDS[i:i + 1]).last_hidden_state
            else:
                fp.set_active_adapters(m, name)
                alone = m.model(input_ids=IDS[i:i + 1]).last_hidden_state
            torch.testing.assert_close(hidden[i:i + 1], alone, rtol=1e-5, atol=1e-5)


def test_compiled_models_run_batches_eagerly_or_say_why():
    """torch.compile(fullgraph=True) with adapter_names: an error that says batches need eager mode or
    fullgraph=False (not a failure deep inside dynamo); with fullgraph=False the batch runs and matches eager."""
    m = _mixed()
    names = ["r4", None, "ia3"]
    with torch.no_grad():
        want = m(input_ids=IDS[:3], adapter_names=names).logits
        with pytest.raises(Exception, match="multi-adapter batches run eagerly.*fullgraph=False"):
            torch.compile(m, fullgraph=True, backend="eager")(input_ids=IDS[:3], adapter_names=names)
        got = torch.compile(m, backend="eager")(input_ids=IDS[:3], adapter_names=names).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_deep_copy_runs_its_own_batches():
    """copy.deepcopy of a model with adapters (EMA copies, evaluation copies) works, and the copy's batches and
    adapters are its own."""
    import copy

    m = _mixed()
    c = copy.deepcopy(m)
    with torch.no_grad():
        want = m(input_ids=IDS[:3], adapter_names=["r4", None, "ia3"]).logits
        torch.testing.assert_close(c(input_ids=IDS[:3], adapter_names=["r4", None, "ia3"]).logits, want)
    fp.delete_adapter(c, "r4")
    assert "r4" in fp.adapters(m) and "r4" not in fp.adapters(c)
    _assert_isolated(m, IDS[:2], ["r4", "ia3"])
