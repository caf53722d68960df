"""transformers.Trainer on a model holding fastpeft adapters, as a user runs it: trainer.save_model() and the periodic
checkpoints write the adapters as fp.save_adapter does (PEFT's multi-adapter layout), fp.load_adapter and PEFT read
what Trainer wrote, and train(resume_from_checkpoint=...) continues exactly where the interrupted run was."""
from __future__ import annotations

import os

import pytest
import torch

import fastpeft as fp

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from tests.models.tiny import VOCAB, model, out  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
IDS = torch.randint(3, VOCAB, (8, 8), generator=torch.Generator().manual_seed(0))
METHODS = {  # (adapter of the first run, its weights file; the file is AdapterHub's for bottleneck adapters)
    "lora": (lambda: fp.LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]), "adapter_model.safetensors"),
    "seq_bn": (lambda: fp.SeqBnConfig(reduction_factor=8), "adapter.safetensors"),
}


class Rows(torch.utils.data.Dataset):
    def __len__(self):
        return len(IDS)

    def __getitem__(self, i):
        return {"input_ids": IDS[i], "labels": IDS[i]}


def _model(method: str, *, other: bool = True):
    """Tiny Llama with the method's adapter "default" (trained) and an inactive LoRA "other" (saved, not trained)."""
    m = model("llama").train()
    fp.add_adapter(m, "default", METHODS[method][0]())
    if other:
        fp.add_adapter(m, "other", fp.LoRAConfig(r=2, target_modules=["k_proj"], init_weights=False))
    return m


def _trainer(m, output_dir, **options):
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=4, save_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
        logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, seed=0, **options)
    return transformers.Trainer(model=m, args=args, train_dataset=Rows(), eval_dataset=Rows())


def _adapter_params(m) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.named_parameters() if ".default" in k or ".other" in k}


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.fixture(scope="module", params=list(METHODS))
def run(request, tmp_path_factory):
    """An uninterrupted 4-step run with checkpoints at steps 2 and 4 (no final save_model yet)."""
    out_dir = tmp_path_factory.mktemp(f"trainer_{request.param}")
    torch.manual_seed(0)
    m = _model(request.param)
    trainer = _trainer(m, out_dir)
    trainer.train()
    return request.param, out_dir, m, trainer


def test_checkpoints_hold_the_adapters_in_peft_layout(run, tmp_path):
    method, out_dir, m, _ = run
    weights = METHODS[method][1]
    for step in (2, 4):
        ckpt = out_dir / f"checkpoint-{step}"
        files = set(os.listdir(ckpt))
        assert {"adapter_config.json", weights, "optimizer.pt", "trainer_state.json"} <= files
        assert "config.json" not in files  # never a full model that from_pretrained would take
        assert (ckpt / "other" / "adapter_config.json").is_file()
        assert (ckpt / "other" / "adapter_model.safetensors").is_file()
    # The output folder before trainer.save_model(): fp.load_adapter reads its last checkpoint.
    assert not (out_dir / "adapter_config.json").exists()
    loaded = model("llama")
    fp.load_adapter(loaded, out_dir)
    fp.load_adapter(loaded, out_dir / "checkpoint-4", name="other")
    assert torch.allclose(out(loaded), out(m.eval()), atol=1e-6)
    mine, theirs = _adapter_params(m), _adapter_params(loaded)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_save_model_output_reads_back_with_fastpeft_and_peft(run):
    method, out_dir, m, trainer = run
    trainer.save_model()
    assert "config.json" not in os.listdir(out_dir)
    expected = out(m.eval())
    loaded = model("llama")
    fp.load_adapter(loaded, out_dir)
    assert torch.allclose(out(loaded), expected, atol=1e-6)
    fp.set_active_adapters(m, "other")
    other = model("llama")
    fp.load_adapter(other, out_dir, name="other")  # the subfolder PEFT's layout puts it in
    assert torch.allclose(out(other), out(m), atol=1e-6)
    fp.set_active_adapters(m, "default")
    if method == "lora":
        peft_model = peft.PeftModel.from_pretrained(model("llama"), str(out_dir))
        assert torch.allclose(out(peft_model), expected, atol=1e-6)
        peft_model.load_adapter(str(out_dir / "other"), adapter_name="other")
        peft_model.set_adapter("other")
        fp.set_active_adapters(m, "other")
        assert torch.allclose(out(peft_model), out(m), atol=1e-6)
        fp.set_active_adapters(m, "default")


def test_resume_reproduces_the_uninterrupted_run(run, tmp_path):
    method, out_dir, m, trainer = run
    torch.manual_seed(123)  # another initialisation: the checkpoint must replace it
    resumed = _model(method)
    second = _trainer(resumed, tmp_path)
    second.train(resume_from_checkpoint=str(out_dir / "checkpoint-2"))
    assert _losses(second) == pytest.approx(_losses(trainer), rel=1e-6)
    mine, theirs = _adapter_params(m), _adapter_params(resumed)
    assert mine.keys() == theirs.keys()
    for key, value in mine.items():
        assert torch.allclose(theirs[key], value, atol=1e-6, rtol=1e-5), key


def _other_rank(method: str):
    m = _model(method, other=False)
    fp.add_adapter(m, "other", fp.LoRAConfig(r=4, target_modules=["k_proj"]))  # saved with r=2
    return m


@pytest.mark.parametrize("make, match", [(lambda method: _model(method, other=False), "adapters this model lacks"),
                                         (_other_rank, "has shape")], ids=["adapter_missing", "other_rank"])
def test_resume_into_other_adapters_is_refused_before_anything_changes(run, tmp_path, make, match):
    method, out_dir, *_ = run
    m = make(method)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(fp.CheckpointError, match=match):
        _trainer(m, tmp_path).train(resume_from_checkpoint=str(out_dir / "checkpoint-2"))
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def test_load_best_model_at_end_restores_the_best_checkpoint(tmp_path):
    torch.manual_seed(0)
    m = _model("lora", other=False)
    # The eval loss falls from step 2 to step 4, so "greater is better" makes the earlier checkpoint the best one.
    trainer = _trainer(m, tmp_path, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                       metric_for_best_model="loss", greater_is_better=True)
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-2")
    best, last = model("llama"), model("llama")
    fp.load_adapter(best, tmp_path / "checkpoint-2")
    fp.load_adapter(last, tmp_path / "checkpoint-4")
    mine, theirs = _adapter_params(m), _adapter_params(best)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert not all(torch.equal(mine[k], v) for k, v in _adapter_params(last).items())
