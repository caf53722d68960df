"""The error catalogue: every kind of bad input fastpeft refuses, one row each, with the same strict checks.

A row names the mistake (its id is a sentence), the tiny model it starts from and how that model is prepared, the bad
call, the fastpeft exception class it must raise, and three regular expressions its message must match:

    what   the bad value or name                       ("r.*0", "'q_prj'", "torch.int64")
    where  the module path, config field, file or argument it sits in   ("LoRAConfig.r", "lora_linear: lora_a")
    how    the fix the message suggests                 ("use e.g. r=8", "closest 'q_proj'")

`check` snapshots the model before the call (a hash of every state-dict tensor's bytes, dtype and shape; every hook
dict of every module, the model's own included; the module tree with types and training flags; every parameter's
identity and requires_grad flag; each module's attributes; the adapters, their bookkeeping and the wrappers' active,
merged and disabled adapters; the attention implementation), runs the call, checks the exception and its message, and
asserts that the snapshot is unchanged: a failing call changes nothing.

Adding a case is one row in CASES:

    Case("a sentence that says what the user did wrong", lambda m: <the bad call on model m>, fp.ConfigError,
         what=r"...", where=r"...", how=r"...", model="llama", setup=<a function preparing m, or None>)

`known="..."` marks a message that still misses its what, where or how (or a call that does not raise a fastpeft
error yet) in code owned elsewhere: the row runs as a strict xfail, so it fails loudly once the message is fixed and
the mark can go. Checkpoint rows read folders made by `checkpoint(kind)` (a good LoRA checkpoint, then one defect).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import fastpeft as fp

transformers = pytest.importorskip("transformers")
from fastpeft.inject.state import get_state  # noqa: E402
from fastpeft.inject.swap import wrappers  # noqa: E402
from tests.models.tiny import IDS, model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
L = re.escape  # a literal piece of a message


# ------------------------------------------------------------------------------------------------ the harness
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
              "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                "_global_backward_pre_hooks")


def tensor_digest(t: torch.Tensor) -> tuple:
    """(dtype, shape, sha256 of the bytes); meta tensors have no bytes."""
    t = t.detach()
    data = b"" if t.is_meta else t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return str(t.dtype), tuple(t.shape), hashlib.sha256(data).hexdigest()


def _summary(value):
    """A comparable picture of adapter bookkeeping: containers by content, other objects by identity."""
    if isinstance(value, dict):
        return {k: _summary(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return type(value).__name__, [_summary(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, fp.AdapterConfig):
        return type(value).__name__, value.to_dict()
    return type(value).__name__, id(value)


def snapshot(m: nn.Module) -> dict:
    """Everything a failing call must leave as it was. Objects are held in "keep" so their ids stay unique."""
    modules = list(m.named_modules(remove_duplicate=False))
    params = list(m.named_parameters(remove_duplicate=False))
    state = get_state(m)
    bookkeeping = None
    if state is not None:
        bookkeeping = {f.name: _summary(getattr(state, f.name)) for f in dataclasses.fields(state) if f.name != "batch"}
        bookkeeping["batch"] = (dict(state.batch.ids), dict(state.batch.refused), state.batch.current)
    return {
        "state dict": {k: tensor_digest(v) for k, v in m.state_dict().items()},
        "parameters": [(n, id(p), p.requires_grad, p.dtype, p.device) for n, p in params],
        "module tree": [(n, type(x), x.training) for n, x in modules],
        "module attributes": [(n, sorted(vars(x))) for n, x in modules],
        "hooks": [(n, h, list(getattr(x, h, {}).items())) for n, x in modules for h in HOOK_DICTS],
        "global hooks": [(h, list(getattr(nn.modules.module, h, {}).items())) for h in GLOBAL_HOOKS],
        "adapters": _summary(fp.adapters(m)),
        "bookkeeping": bookkeeping,
        "wrappers": [(n, type(w), list(w.active_adapters), list(getattr(w, "merged_adapters", [])),
                      getattr(w, "disabled", None), list(w.adapter_names)) for n, w in wrappers(m)],
        "attention": getattr(getattr(m, "config", None), "_attn_implementation", None),
        "keep": (params, modules),
    }


def assert_unchanged(before: dict, after: dict) -> None:
    for key in before:
        if key == "keep":
            continue
        if key == "state dict" and before[key] != after[key]:
            changed = sorted(k for k in before[key].keys() | after[key].keys()
                             if before[key].get(k) != after[key].get(k))
            raise AssertionError(f"the state dict changed: {changed[:5]}")
        assert before[key] == after[key], f"the failing call changed the model's {key}"


def check(case: Case, m: nn.Module) -> None:
    """Run the bad call on m: the right fastpeft error, a message with what, where and how, m unchanged."""
    before = snapshot(m)
    with pytest.raises(fp.FastPEFTError) as info:
        case.call(m)
    error, message = info.value, str(info.value)
    assert isinstance(error, case.error), f"raised {type(error).__name__}, not {case.error.__name__}: {message}"
    for part in ("what", "where", "how"):
        pattern = getattr(case, part)
        assert re.search(pattern, message), f"the message does not say {part} ({pattern!r}): {message}"
    assert_unchanged(before, snapshot(m))


@dataclass(frozen=True)
class Case:
    id: str                                   # a sentence: what the user did wrong
    call: Callable[[nn.Module], object]       # the bad call, on the prepared model
    error: type                               # the fastpeft exception class it raises
    what: str                                 # regexes the message must match
    where: str
    how: str
    model: str = "llama"                      # a key of BUILDERS
    setup: Callable[[nn.Module], object] | None = None  # prepares the model before the snapshot
    known: str | None = None                  # a known defect of code owned elsewhere: strict xfail until fixed


# ------------------------------------------------------------------------------------------------ models
class Linear4bit(nn.Module):
    """Stands for bitsandbytes' Linear4bit: a linear layer with packed uint8 weights and its own forward."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        packed = torch.zeros(base.in_features * base.out_features // 2, 1, dtype=torch.uint8)
        self.weight = nn.Parameter(packed, requires_grad=False)

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.out_features)


class QuantizedWeight(torch.Tensor):
    """Stands for torchao's quantized weights (NF4Tensor, int8 tensors): a tensor subclass with a floating dtype
    held by a plain nn.Linear, whose storage is not W's values."""

    def __deepcopy__(self, memo):  # the catalogue snapshots the model
        return nn.Parameter(self.as_subclass(torch.Tensor).clone().as_subclass(QuantizedWeight), requires_grad=False)


def _quantized_weight(base: nn.Linear) -> nn.Module:
    base.weight = nn.Parameter(base.weight.detach().as_subclass(QuantizedWeight), requires_grad=False)
    return base


class ScaledLinear(nn.Linear):
    """An nn.Linear subclass with a forward of its own: fastpeft has no rule for it (its base product may differ)."""

    def forward(self, x):
        return 2 * super().forward(x)


def _with_q_proj(kind: Callable[[nn.Linear], nn.Module]) -> Callable[[], nn.Module]:
    def build():
        m = model()
        for layer in m.model.layers:
            layer.self_attn.q_proj = kind(layer.self_attn.q_proj)
        return m
    return build


def _scaled(base: nn.Linear) -> nn.Module:
    layer = ScaledLinear(base.in_features, base.out_features, bias=False)
    layer.weight = base.weight
    return layer


def _gpt_neox():  # a transformers family without a row in fastpeft/inject/families.py
    return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64)).eval()


def _wide_llama():  # the tiny Llama with hidden size 64: adapters of the 32-wide one do not fit
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)).eval()


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    **{kind: (lambda kind=kind: model(kind)) for kind in ("llama", "gpt2", "t5", "bert", "opt")},
    "llama with Linear4bit q_proj": _with_q_proj(Linear4bit),
    "llama with ScaledLinear q_proj": _with_q_proj(_scaled),
    "llama with a quantized-tensor q_proj weight": _with_q_proj(_quantized_weight),
    "gpt_neox": _gpt_neox,
    "wide llama": _wide_llama,
}
_BUILT: dict[str, nn.Module] = {}


def base(kind: str) -> nn.Module:
    """A fresh copy of model `kind` (each built once)."""
    if kind not in _BUILT:
        torch.manual_seed(1)
        _BUILT[kind] = BUILDERS[kind]()
    return copy.deepcopy(_BUILT[kind])


# ------------------------------------------------------------------------------------------------ setups
def lora(m, **kw):
    fp.add_adapter(m, "a", fp.LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False, **kw))


def lora_merged(m):
    lora(m)
    fp.merge_adapter(m, "a")


def lora_with_head(m):
    lora(m, modules_to_save=["lm_head"])


def ia3_scaling_input(m):
    fp.add_adapter(m, "a", fp.IA3Config(target_modules=["q_proj"], feedforward_modules=["q_proj"]))


def bottleneck(m):
    fp.add_adapter(m, "a", fp.SeqBnConfig(reduction_factor=4))


def lora_and_prompt(m):
    lora(m)
    prompt(m)


def prompt(m):
    fp.add_adapter(m, "p", fp.PromptTuningConfig(prompt_length=2))


def two_prompts(m):
    prompt(m)
    fp.add_adapter(m, "q", fp.PromptTuningConfig(prompt_length=2, combine="prefix_after_bos"))
    fp.set_active_adapters(m, ["p", "q"])


def lora_and_ia3(m):
    lora(m)
    fp.add_adapter(m, "i", fp.IA3Config(target_modules=["q_proj"], feedforward_modules=[]))


def mergeable_then_nested(m):
    """Active: 'b' (LoRA on k_proj, mergeable), then 'a' (LoRA on q_proj, which IA3 adapter 'i' also holds)."""
    fp.add_adapter(m, "b", fp.LoRAConfig(r=2, target_modules=["k_proj"], init_weights=False))
    lora_and_ia3(m)
    fp.set_active_adapters(m, ["b", "a"])


def dora_and_lora(m):
    fp.add_adapter(m, "a", fp.LoRAConfig(r=2, target_modules=["q_proj"], use_dora=True))
    fp.add_adapter(m, "b", fp.LoRAConfig(r=2, target_modules=["q_proj"]))
    fp.set_active_adapters(m, ["a", "b"])


def adalora(m):
    fp.add_adapter(m, "a", fp.AdaLoRAConfig(total_step=10, target_modules=["q_proj"]))


# ------------------------------------------------------------------------------------------------ call helpers
def batch_run(m, ids):
    """A forward of the tiny batch (2 rows) inside fp.adapter_batch(m, ids)."""
    with torch.no_grad(), fp.adapter_batch(m, ids):
        m(input_ids=IDS)


def forward(m, **kw):
    with torch.no_grad():
        return m(input_ids=IDS, **kw)


def disabled(m):
    with fp.disable_adapters(m):
        pass


def with_env(call, **values):
    """call() with these environment variables set, then restored."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        return call()
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def forced(backend, call):
    with fp.ops.use_backend(backend):
        return call()


def changed_after_creation(config, **fields):
    for k, v in fields.items():
        setattr(config, k, v)
    return config


# The functional ops get the model's own q_proj weight (32 x 32), so a failing op is seen not to touch it.
def W(m):
    return m.model.layers[0].self_attn.q_proj.weight


def X(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*(shape or (2, 3, 32))).to(dtype=dtype, device=device)


def A(r=4, k=32, **kw):
    return X(r, k, **kw)


def B(n=32, r=4, **kw):
    return X(n, r, **kw)


def lora_op(m, **kw):
    args = dict(x=X(), weight=W(m), bias=None, lora_a=A(), lora_b=B(), scale=2.0) | kw
    return fp.ops.lora_linear(**args)


def dora_op(m, **kw):
    args = dict(x=X(), weight=W(m), bias=None, lora_a=A(), lora_b=B(), scale=2.0, magnitude=X(32)) | kw
    return fp.ops.dora_linear(**args)


def bottleneck_op(m, **kw):
    args = dict(x=X(), residual=X(), w_down=X(8, 32), b_down=None, w_up=X(32, 8), b_up=None) | kw
    return fp.ops.bottleneck_adapter(**args)


def attention_op(**kw):
    args = dict(q=X(2, 4, 5, 8), k=X(2, 2, 5, 8), v=X(2, 2, 5, 8)) | kw
    return fp.ops.prefix_attention(**args)


def multi_lora_op(m, **kw):
    args = dict(x=X(3, 32), weight=W(m), bias=None, lora_a=[A(), A(2)], lora_b=[B(), B(r=2)], scale=[1.0, 2.0],
                adapter_index=torch.tensor([0, 1, -1])) | kw
    return fp.ops.multi_lora_linear(**args)


def multi_ia3_op(m, **kw):
    args = dict(x=X(3, 32), weight=W(m), bias=None, vectors=[X(32), X(32)], adapter_index=torch.tensor([0, 1, -1]))
    return fp.ops.multi_ia3_linear(**(args | kw))


# ------------------------------------------------------------------------------------------------ checkpoints
_FILES: dict[str, Path] = {}
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def _edit_json(name, **changes):
    def edit(d: Path):
        path = d / name
        data = json.loads(path.read_text())
        data.update(changes)
        path.write_text(json.dumps(data))
    return edit


def _edit_tensors(edit_dict):
    def edit(d: Path):
        from safetensors.torch import load_file, save_file
        path = d / WEIGHTS
        tensors = load_file(path)
        edit_dict(tensors)
        save_file(tensors, path)
    return edit


def _cut(d: Path):
    path = d / WEIGHTS
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _scramble_header(d: Path):
    path = d / WEIGHTS
    path.write_bytes(b"\xff" * 8 + path.read_bytes()[8:])


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
DEFECTS: dict[str, Callable[[Path], None]] = {
    "good": lambda d: None,
    "truncated": _cut,
    "corrupted header": _scramble_header,
    "unreadable json": lambda d: (d / CONFIG).write_text("{not json"),
    "no config": lambda d: (d / CONFIG).unlink(),
    "no weights": lambda d: (d / WEIGHTS).unlink(),
    "unknown method": _edit_json(CONFIG, peft_type="LOHA"),
    "labelled ia3": _edit_json(CONFIG, peft_type="IA3"),
    "rank zero": _edit_json(CONFIG, r=0),
    "lora bias": _edit_json(CONFIG, lora_bias=True),
    "extra tensor": _edit_tensors(lambda t: t.update({Q0.replace("q_proj", "zz_proj") + ".lora_A.weight":
                                                      torch.zeros(4, 32)})),
    "missing tensor": _edit_tensors(lambda t: t.pop(Q0 + ".lora_A.weight")),
    "integer tensor": _edit_tensors(lambda t: t.update({Q0 + ".lora_A.weight": torch.zeros(4, 32, dtype=torch.int32)})),
}


@pytest.fixture(scope="module", autouse=True)
def _checkpoint_root(tmp_path_factory):
    _FILES["root"] = tmp_path_factory.mktemp("checkpoints")
    yield
    _FILES.clear()


def checkpoint(kind: str) -> str:
    """A folder with the tiny Llama's LoRA adapter (q_proj and v_proj, r=4) as fp.save_adapter writes it, then the
    defect `kind` (DEFECTS) applied; made on first use."""
    root = _FILES["root"]
    if not (root / "good").exists():
        m = base("llama")
        lora(m)
        fp.save_adapter(m, root / "good", "a")
    folder = root / kind
    if not folder.exists():
        shutil.copytree(root / "good", folder)
        DEFECTS[kind](folder)
    return str(folder)


def load(m, kind, name="x"):
    return fp.load_adapter(m, checkpoint(kind), name=name)


# ------------------------------------------------------------------------------------------------ the cases
HAS_TRITON = importlib.util.find_spec("triton") is not None
CONFIG_CASES = [
    Case("a LoRA rank of zero", lambda m: fp.LoRAConfig(r=0), fp.ConfigError,
         what=r"got 0", where=L("LoRAConfig.r:"), how=L("use e.g. r=8")),
    Case("a LoRA dropout of one", lambda m: fp.LoRAConfig(dropout=1.0), fp.ConfigError,
         what=L("[0, 1), got 1.0"), where=L("LoRAConfig.dropout"), how=L("use e.g. dropout=0.05")),
    Case("a LoRA alpha that is not a number", lambda m: fp.LoRAConfig(alpha=float("nan")), fp.ConfigError,
         what=r"finite number, got nan", where=L("LoRAConfig.alpha"), how=L("use e.g. alpha=16")),
    Case("a LoRA bias mode that does not exist", lambda m: fp.LoRAConfig(bias="some"), fp.ConfigError,
         what=L("'some'"), where=L("LoRAConfig.bias"), how=L('use "none", "all" or "lora_only"')),
    Case("a LoRA initialisation that does not exist", lambda m: fp.LoRAConfig(init_weights="xavier"),
         fp.ConfigError, what=L("'xavier'"), where=L("LoRAConfig.init_weights"), how=L('"gaussian" or False')),
    Case("target_modules that is not a valid regular expression", lambda m: fp.LoRAConfig(target_modules="(q"),
         fp.ConfigError, what=L("'(q' is not a valid regular expression"), where=L("LoRAConfig.target_modules"),
         how=L("pass a list of module names or a valid regex")),
    Case("alpha and its PEFT alias lora_alpha that disagree", lambda m: fp.LoRAConfig(alpha=16, lora_alpha=32),
         fp.ConfigError, what=L("alpha=16") + ".*" + L("lora_alpha=32"), where=L("LoRAConfig:"),
         how=L("pass only one")),
    Case("a config dict with a misspelt field", lambda m: fp.LoRAConfig.from_dict({"rank": 8}), fp.ConfigError,
         what=L("unknown field(s) rank"), where=L("LoRAConfig:"),
         how=r"closest: .*'r'.*rename or drop them, the known fields"),
    Case("a rank_pattern entry of rank zero", lambda m: fp.LoRAConfig(rank_pattern={"q_proj": 0}), fp.ConfigError,
         what=L("rank 0 for 'q_proj'"), where=L("LoRAConfig.rank_pattern"), how=L("e.g. {'q_proj': 8}")),
    Case("use_rslora given as a string", lambda m: fp.LoRAConfig(use_rslora="yes"), fp.ConfigError,
         what=L("got 'yes'"), where=L("LoRAConfig.use_rslora"), how=L("use use_rslora=True or False")),
    Case("exclude_modules given as a number", lambda m: fp.LoRAConfig(exclude_modules=3), fp.ConfigError,
         what=L("got 3"), where=L("LoRAConfig.exclude_modules"), how=L("pass a list of module names or a regex")),
    Case("layers_pattern given as a number", lambda m: fp.LoRAConfig(layers_pattern=3), fp.ConfigError,
         what=L("got 3"), where=L("LoRAConfig.layers_pattern"), how=L("the ModuleList that holds the transformer")),
    Case("a config changed to a bad value after it was made",
         lambda m: fp.add_adapter(m, "b", changed_after_creation(fp.LoRAConfig(target_modules=["q_proj"]), r=0)),
         fp.ConfigError, what=L("got 0"), where=L("LoRAConfig.r"), how=L("use e.g. r=8")),
    Case("a plain dict passed as the config", lambda m: fp.add_adapter(m, "a", {"r": 8}), fp.ConfigError,
         what=L("got dict"), where=L("add_adapter: config"), how=L("fp.LoRAConfig(...)")),
    Case("an AdaLoRA target rank above its initial rank",
         lambda m: fp.AdaLoRAConfig(init_r=4, target_r=8, total_step=10), fp.ConfigError,
         what=L("target_r=8 is above init_r=4"), where=L("AdaLoRAConfig.target_r"), how=L("choose target_r <= init_r")),
    Case("an AdaLoRA config without total_step", lambda m: fp.AdaLoRAConfig(), fp.ConfigError,
         what=L("got None"), where=L("AdaLoRAConfig.total_step"), how=L("total_step=len(dataloader) * epochs")),
    Case("an AdaLoRA warm-up that leaves no step to prune", lambda m: fp.AdaLoRAConfig(total_step=10, tinit=10),
         fp.ConfigError, what=L("tinit=10 leaves no steps"), where=L("AdaLoRAConfig.tinit"),
         how=L("lower tinit or tfinal, or raise total_step")),
    Case("IA3 asked for all-linear", lambda m: fp.IA3Config(target_modules="all-linear"), fp.ConfigError,
         what=L('"all-linear" is not defined for IA3'), where=L("IA3Config.target_modules"),
         how=L("feedforward_modules=['down_proj']")),
    Case("IA3 feed-forward modules outside its targets",
         lambda m: fp.IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"]), fp.ConfigError,
         what=L("['down_proj'] are not in target_modules"), where=L("IA3Config.feedforward_modules"),
         how=L("add them to target_modules")),
    Case("IA3 feed-forward modules without targets", lambda m: fp.IA3Config(feedforward_modules=["down_proj"]),
         fp.ConfigError, what=L("was given without target_modules"), where=L("IA3Config.feedforward_modules"),
         how=L("give target_modules too")),
    Case("a bottleneck config with every adapter site off", lambda m: fp.BnConfig(output_adapter=False),
         fp.ConfigError, what=L("all off"), where=L("BnConfig.output_adapter"), how=L("set output_adapter=True")),
    Case("a reduction_factor mapping without a default", lambda m: fp.BnConfig(reduction_factor={"0": 2}),
         fp.ConfigError, what=L("needs a 'default' entry"), where=L("BnConfig.reduction_factor"),
         how=L("add 'default': 16")),
    Case("a bottleneck non-linearity that does not exist", lambda m: fp.SeqBnConfig(non_linearity="swishh"),
         fp.ConfigError, what=L("'swishh' is not supported"), where=L("SeqBnConfig.non_linearity"),
         how=L("use one of gelu")),
    Case("a parallel adapter scaling that is neither a number nor a mode", lambda m: fp.ParBnConfig(scaling="big"),
         fp.ConfigError, what=L("got 'big'"), where=L("ParBnConfig.scaling"), how=L('use a number, "learned"')),
    Case("an invertible adapter kind that does not exist", lambda m: fp.SeqBnInvConfig(inv_adapter="real"),
         fp.ConfigError, what=L("'real' is not an invertible adapter"), where=L("SeqBnInvConfig.inv_adapter"),
         how=L('use "nice" or "glow"')),
    Case("a Compacter phm_dim of zero", lambda m: fp.CompacterConfig(phm_dim=0), fp.ConfigError,
         what=L("got 0"), where=L("CompacterConfig.phm_dim"), how=L("use e.g. phm_dim=4")),
    Case("a Compacter++ rule initialisation that does not exist",
         lambda m: fp.CompacterPlusPlusConfig(phm_c_init="zeros"), fp.ConfigError,
         what=L("got 'zeros'"), where=L("CompacterPlusPlusConfig.phm_c_init"), how=L('use "normal" or "uniform"')),
    Case("a prefix of length zero", lambda m: fp.PrefixTuningConfig(prefix_length=0), fp.ConfigError,
         what=L("got 0"), where=L("PrefixTuningConfig.prefix_length"), how=L("use e.g. prefix_length=30")),
    Case("a prefix-tuning flag given as a string", lambda m: fp.PrefixTuningConfig(flat="yes"), fp.ConfigError,
         what=L("got 'yes'"), where=L("PrefixTuningConfig.flat"), how=L("use flat=True or False")),
    Case("a prompt initialised from a text that is not given",
         lambda m: fp.PromptTuningConfig(prompt_init="from_string"), fp.ConfigError,
         what=L("is missing"), where=L("PromptTuningConfig.prompt_init_text"), how=L("pass prompt_init_text=")),
    Case("a prompt placement that does not exist", lambda m: fp.PromptTuningConfig(combine="suffix"),
         fp.ConfigError, what=L("got 'suffix'"), where=L("PromptTuningConfig.combine"),
         how=L('use "prefix" or "prefix_after_bos"')),
    Case("a P-tuning encoder kind that does not exist", lambda m: fp.PTuningConfig(encoder_type="GRU"),
         fp.ConfigError, what=L("got 'GRU'"), where=L("PTuningConfig.encoder_type"), how=L('use "MLP" or "LSTM"')),
    Case("a P-tuning encoder dropout of one", lambda m: fp.PTuningConfig(encoder_dropout=1.0), fp.ConfigError,
         what=L("got 1.0"), where=L("PTuningConfig.encoder_dropout"), how=L("use e.g. encoder_dropout=0.1")),
    Case("a LLaMA-Adapter prompt of length zero", lambda m: fp.LlamaAdapterConfig(adapter_len=0), fp.ConfigError,
         what=L("got 0"), where=L("LlamaAdapterConfig.adapter_len"), how=L("use e.g. adapter_len=10")),
    Case("a saved config whose method fastpeft does not know",
         lambda m: fp.config.config_from_dict({"method": "lorax"}), fp.ConfigError,
         what=L("method='lorax'"), where=L("config_from_dict"), how=L("use one of adalora, bottleneck")),
    # config fields that only a model can refute
    Case("a reduction factor that does not divide the hidden size",
         lambda m: fp.add_adapter(m, "a", fp.SeqBnConfig(reduction_factor=5)), fp.ConfigError,
         what=L("5 (layer 0) does not divide the hidden size 32"), where=L("SeqBnConfig.reduction_factor"),
         how=L("use a factor that does, e.g. 2, 4, 8")),
    Case("a Compacter phm_dim that does not divide the bottleneck",
         lambda m: fp.add_adapter(m, "a", fp.CompacterConfig(phm_dim=5)), fp.ConfigError,
         what=L("5 must divide the hidden size 32"), where=L("CompacterConfig.phm_dim"),
         how=L("choose a phm_dim that divides both")),
    Case("a bottleneck leave_out naming a layer the model lacks",
         lambda m: fp.add_adapter(m, "a", fp.SeqBnConfig(leave_out=[7])), fp.ConfigError,
         what=L("layer(s) [7] do not exist"), where=L("SeqBnConfig.leave_out"), how=L("list indices in that range")),
    Case("a reduction_factor mapping naming a layer the model lacks",
         lambda m: fp.add_adapter(m, "a", fp.SeqBnConfig(reduction_factor={"5": 2, "default": 4})), fp.ConfigError,
         what=L("keys ['5']"), where=L("SeqBnConfig.reduction_factor"), how=L("use keys '0'..'1' and 'default'")),
    Case("a bottleneck after cross-attention",
         lambda m: fp.add_adapter(m, "a", fp.SeqBnConfig(cross_adapter=True)), fp.ConfigError,
         what=L("not supported yet"), where=L("SeqBnConfig.cross_adapter"), how=L("use cross_adapter=False")),
    Case("a prefix left out of every layer",
         lambda m: fp.add_adapter(m, "a", fp.PrefixTuningConfig(prefix_length=2, bottleneck_size=8, leave_out=[0, 1])),
         fp.ConfigError, what=L("no attention layer is left"), where=L("PrefixTuningConfig"),
         how=L("leave out fewer layers")),
    Case("invertible adapters too narrow for their reduction factor",
         lambda m: fp.add_adapter(m, "a", fp.SeqBnInvConfig(inv_adapter_reduction_factor=64)), fp.ConfigError,
         what=L("64 leaves the invertible adapter's subnets no hidden unit"),
         where=L("SeqBnInvConfig.inv_adapter_reduction_factor"), how=L("use a positive factor of at most 16")),
    Case("one shared Compacter weight for layers of different widths",
         lambda m: fp.add_adapter(m, "a", fp.CompacterConfig(shared_W_phm=True, phm_dim=2,
                                                             reduction_factor={"0": 4, "default": 8})),
         fp.ConfigError, what=L("the layers' bottleneck widths differ"), where=L("CompacterConfig.shared_W_phm"),
         how=L("use one reduction_factor or shared_W_phm=False")),
    Case("a post-LN block asked to skip its own layer norm",
         lambda m: fp.add_adapter(m, "a", fp.SeqBnConfig(original_ln_after=False)), fp.ConfigError, model="bert",
         what=L("False is not supported on post-LN blocks (bert)"), where=L("SeqBnConfig.original_ln_after"),
         how=L("use original_ln_after=True")),
    Case("a LLaMA-Adapter on more layers than the model has",
         lambda m: fp.add_adapter(m, "a", fp.LlamaAdapterConfig(adapter_len=2, adapter_layers=5)), fp.ConfigError,
         what=L("5 layers asked for"), where=L("LlamaAdapterConfig.adapter_layers"), how=L("use adapter_layers <= 2")),
    Case("a prompt initialised from text without a tokenizer",
         lambda m: fp.add_adapter(m, "a", fp.PromptTuningConfig(prompt_init="from_string", prompt_init_text="hi")),
         fp.ConfigError, what=L("no tokenizer was given"), where=L("PromptTuningConfig.tokenizer"),
         how=L("pass PromptTuningConfig(tokenizer=")),
]

TARGET_CASES = [
    Case("a misspelt target name", lambda m: fp.add_adapter(m, "b", fp.LoRAConfig(target_modules=["q_prj"])),
         fp.TargetError, setup=lora, what=L("'q_prj' matched no module"), where=L("LoRAConfig: target_modules"),
         how=L("closest 'q_proj'")),
    Case("a target regex that matches no module path",
         lambda m: fp.add_adapter(m, "a", fp.LoRAConfig(target_modules=r".*\.attention\.query")), fp.TargetError,
         what=L("matched no linear layer"), where=L("LoRAConfig: target_modules="),
         how=L("a regex must match a whole module path such as 'model.layers.0.self_attn.q_proj'")),
    Case("an embedding as a LoRA target",
         lambda m: fp.add_adapter(m, "a", fp.LoRAConfig(target_modules=["embed_tokens"])), fp.TargetError,
         what=L("(Embedding), which are not linear layers"), where=L("model.embed_tokens"),
         how=L("modules_to_save=['embed_tokens']")),
    Case("an attention block as a LoRA target",
         lambda m: fp.add_adapter(m, "a", fp.LoRAConfig(target_modules=["self_attn"])), fp.TargetError,
         what=L("(LlamaAttention), which are blocks, not linear layers"), where=L("model.layers.0.self_attn"),
         how=L("name the linear layers inside them instead, e.g. 'k_proj', 'o_proj', 'q_proj'")),
    Case("a named quantized Linear4bit target",
         lambda m: fp.add_adapter(m, "a", fp.LoRAConfig(target_modules=["q_proj"])), fp.TargetError,
         model="llama with Linear4bit q_proj",
         what=L("(Linear4bit, weight Parameter uint8): linear layers fastpeft cannot compute with yet"),
         where=L("model.layers.0.self_attn.q_proj"),
         how=L("Load the base model without quantization (e.g. torch_dtype=torch.bfloat16), or leave these layers "
               "out")),
    Case("a LoRA target whose nn.Linear holds a quantized tensor subclass (torchao), never computed wrongly",
         lambda m: fp.add_adapter(m, "a", fp.LoRAConfig(target_modules=["q_proj", "v_proj"])), fp.TargetError,
         model="llama with a quantized-tensor q_proj weight",
         what=L("(Linear, weight QuantizedWeight float32): linear layers fastpeft cannot compute with yet"),
         where=L("model.layers.0.self_attn.q_proj"), how=L("exclude_modules=[...]")),
    Case("a named nn.Linear subclass with its own forward",
         lambda m: fp.add_adapter(m, "a", fp.IA3Config(target_modules=["q_proj"])), fp.TargetError,
         model="llama with ScaledLinear q_proj",
         what=L("(ScaledLinear, weight Parameter float32): linear layers fastpeft cannot compute with yet"),
         where=L("IA3Config: target_modules matched model.layers.0.self_attn.q_proj"),
         how=L("leave these layers out with exclude_modules=[...]")),
    Case("all-linear over quantized layers, which are refused rather than skipped",
         lambda m: fp.add_adapter(m, "a", fp.LoRAConfig(target_modules="all-linear")), fp.TargetError,
         model="llama with Linear4bit q_proj", what=L("(Linear4bit, weight Parameter uint8)"),
         where=L("model.layers.1.self_attn.q_proj"),
         how=L("exclude_modules=[...]")),
    Case("layers_to_transform naming a layer the model lacks",
         lambda m: fp.add_adapter(m, "a", fp.LoRAConfig(target_modules=["q_proj"], layers_to_transform=[0, 5])),
         fp.TargetError, what=L("names layer(s) [5]"), where=L("LoRAConfig: layers_to_transform=[0, 5]"),
         how=L("use indices in 0..1")),
    Case("a layers_pattern that names no list of blocks",
         lambda m: fp.add_adapter(m, "a", fp.LoRAConfig(target_modules=["q_proj"], layers_to_transform=[0],
                                                        layers_pattern="blocks")),
         fp.TargetError, what=L("layers_pattern='blocks'"), where=L("LoRAConfig: layers_to_transform=[0]"),
         how=L("set layers_pattern to the ModuleList that holds the blocks ('layers')")),
    Case("exclude_modules that removes every target",
         lambda m: fp.add_adapter(m, "a", fp.LoRAConfig(target_modules=["q_proj"], exclude_modules=["q_proj"])),
         fp.TargetError, what=L("removed all 2 modules it matched"), where=L("exclude_modules=['q_proj']"),
         how=L("exclude fewer")),
    Case("layers_to_transform that keeps none of the targets",
         lambda m: fp.add_adapter(m, "a", fp.LoRAConfig(target_modules=["lm_head"], layers_to_transform=[0])),
         fp.TargetError, what=L("kept none of the 1 modules it matched"), where=L("layers_to_transform=[0]"),
         how=L("choose layers that hold them")),
    Case("a misspelt modules_to_save entry",
         lambda m: fp.add_adapter(m, "a", fp.LoRAConfig(target_modules=["q_proj"], modules_to_save=["lm_haed"])),
         fp.TargetError, what=L("'lm_haed'"), where=L("LoRAConfig: modules_to_save"), how=L("closest 'lm_head'")),
    Case("modules_to_save holding a layer another adapter adapts",
         lambda m: fp.add_adapter(m, "b", fp.LoRAConfig(target_modules=["k_proj"],
                                                        modules_to_save=["layers.0.self_attn"])),
         fp.TargetError, setup=lora, what=L("is, or contains, an adapted layer"),
         where=L("modules_to_save entry model.layers.0.self_attn"), how=L("remove it from one of the two")),
    Case("a target that another adapter copies whole",
         lambda m: fp.add_adapter(m, "b", fp.LoRAConfig(target_modules=["lm_head"])), fp.TargetError,
         setup=lora_with_head, what=L("lm_head (ModulesToSave), which adapter(s) 'a' copy whole"),
         where=L("LoRAConfig: target_modules"), how=L("drop it from target_modules")),
    Case("a second IA3 adapter scaling the other side of a layer",
         lambda m: fp.add_adapter(m, "b", fp.IA3Config(target_modules=["q_proj"], feedforward_modules=[])),
         fp.TargetError, setup=ia3_scaling_input, what=L("already holds IA3 adapters that scale its input"),
         where=L("model.layers.0.self_attn.q_proj"), how=L("adjust feedforward_modules")),
    Case("IA3 feed-forward modules that exclude_modules took out",
         lambda m: fp.add_adapter(m, "a", fp.IA3Config(target_modules=["k_proj", "down_proj"],
                                                       feedforward_modules=["down_proj"],
                                                       exclude_modules=["down_proj"])),
         fp.TargetError, what=L("['down_proj'] match none of the targeted layers"),
         where=L("IA3Config.feedforward_modules"), how=L("name layers that target_modules also selects")),
    Case("LoRA's default targets on a family without a row", lambda m: fp.add_adapter(m, "a", fp.LoRAConfig()),
         fp.TargetError, model="gpt_neox", what=L("model_type='gpt_neox'"), where=L("LoRAConfig: no default target"),
         how=L("pass target_modules=[...] (linear layer names in this model: dense")),
    Case("IA3's default targets on a family without a row", lambda m: fp.add_adapter(m, "a", fp.IA3Config()),
         fp.TargetError, model="gpt_neox", what=L("model_type='gpt_neox'"), where=L("IA3Config: no default target"),
         how=L("and feedforward_modules=[...]")),
    Case("a bottleneck adapter on a family without a placement row",
         lambda m: fp.add_adapter(m, "a", fp.SeqBnConfig()), fp.TargetError, model="opt",
         what=L("no placement row for model_type='opt'"), where=L("SeqBnConfig"),
         how=L("fp.LoRAConfig or fp.IA3Config with target_modules=[...]")),
    Case("prefix tuning on a family without an attention row",
         lambda m: fp.add_adapter(m, "a", fp.PrefixTuningConfig(prefix_length=2, bottleneck_size=8)),
         fp.TargetError, model="gpt_neox", what=L("no row for model_type='gpt_neox'"), where=L("PrefixTuningConfig"),
         how=L("Use a model of one of them")),
    Case("LLaMA-Adapter on a family without a row",
         lambda m: fp.add_adapter(m, "a", fp.LlamaAdapterConfig(adapter_len=2)), fp.TargetError, model="gpt_neox",
         what=L("no row for model_type='gpt_neox'"), where=L("LlamaAdapterConfig"),
         how=r"supported families: bert, gemma, llama.*Use a model of one of them"),
    Case("prefix tuning over an attention implementation it cannot wrap",
         lambda m: fp.add_adapter(m, "a", fp.PrefixTuningConfig(prefix_length=2, bottleneck_size=8)), fp.TargetError,
         setup=lambda m: setattr(m.config, "_attn_implementation", "flex_attention"),
         what=L("attention implementation is 'flex_attention'"), where=L("PrefixTuningConfig"),
         how=L("Call model.set_attn_implementation('sdpa') first")),
    Case("LLaMA-Adapter on GPT-2's fused projection",
         lambda m: fp.add_adapter(m, "a", fp.LlamaAdapterConfig(adapter_len=2)), fp.TargetError, model="gpt2",
         what=L("one fused projection (c_attn)"), where=L("LlamaAdapterConfig"),
         how=L("use prefix tuning (fp.PrefixTuningConfig) instead")),
    Case("LLaMA-Adapter on an encoder-decoder model",
         lambda m: fp.add_adapter(m, "a", fp.LlamaAdapterConfig(adapter_len=2)), fp.TargetError, model="t5",
         what=L("T5ForConditionalGeneration is an encoder-decoder model"), where=L("LlamaAdapterConfig"),
         how=r"\(bert, gemma, llama, mistral, qwen2, qwen3, roberta, xlm-roberta\); on this model, use prefix tuning"),
]

ADAPTER_CASES = [
    Case("an adapter name with a dot", lambda m: fp.add_adapter(m, "a.b", fp.LoRAConfig(target_modules=["q_proj"])),
         fp.AdapterError, what=L("'a.b' is not usable"), where=L("add_adapter: adapter name"),
         how=L("(no dots), e.g. 'default'")),
    Case("an adapter name the model already has",
         lambda m: fp.add_adapter(m, "a", fp.LoRAConfig(target_modules=["k_proj"])), fp.AdapterError, setup=lora,
         what=L("already has an adapter named 'a'"), where=L("add_adapter"), how=L("fp.delete_adapter(model, name)")),
    Case("activating an adapter that does not exist", lambda m: fp.set_active_adapters(m, ["a", "nope"]),
         fp.AdapterError, setup=lora, what=L("no adapter named 'nope'"), where=L("set_active_adapters"),
         how=L("(adapters: 'a')")),
    Case("merging an adapter that does not exist", lambda m: fp.merge_adapter(m, "nope"), fp.AdapterError,
         setup=lora, what=L("no adapter named 'nope'"), where=L("merge_adapter"), how=L("(adapters: 'a')")),
    Case("deleting an adapter that does not exist", lambda m: fp.delete_adapter(m, "nope"), fp.AdapterError,
         setup=lora, what=L("no adapter named 'nope'"), where=L("delete_adapter"), how=L("(adapters: 'a')")),
    Case("merging on a model without adapters", lambda m: fp.merge_adapter(m, "a"), fp.AdapterError,
         what=L("has no fastpeft adapters"), where=L("merge_adapter"), how=L("fp.add_adapter(model, name, config)")),
    Case("merging an adapter twice", lambda m: fp.merge_adapter(m, "a"), fp.AdapterError, setup=lora_merged,
         what=L("'a' is already merged"), where=L("merge_adapter"), how=L("Call fp.unmerge_adapter(model)")),
    Case("deleting a merged adapter", lambda m: fp.delete_adapter(m, "a"), fp.AdapterError, setup=lora_merged,
         what=L("'a' is merged into model.layers.0.self_attn.q_proj"), where=L("delete_adapter"),
         how=L("call fp.unmerge_adapter(model) first")),
    Case("disabling adapters while one is merged", disabled, fp.AdapterError, setup=lora_merged,
         what=L("merged into the base weights of model.layers.0.self_attn.q_proj"), where=L("disable_adapters"),
         how=L("call fp.unmerge_adapter(model) first")),
    Case("merging a bottleneck adapter", lambda m: fp.merge_adapter(m, "a"), fp.AdapterError, setup=bottleneck,
         what=L("SeqBnConfig adapters cannot be merged"), where=L("merge_adapter"), how=r"unload|keep it unmerged"),
    Case("unloading with merge=True when an active adapter cannot be merged", lambda m: fp.unload(m, merge=True),
         fp.AdapterError, setup=mergeable_then_nested, what=L("holds both LoRA and IA3 adapters"),
         where=L("unload"), how=L("Delete the other method's adapters there first")),
    Case("activating adapters given as a number", lambda m: fp.set_active_adapters(m, 3), fp.AdapterError,
         setup=lora, what=r"\b3\b", where=L("set_active_adapters"), how=r"name|list"),
    Case("merging on a layer that holds LoRA and IA3 adapters", lambda m: fp.merge_adapter(m, "a"), fp.AdapterError,
         setup=lora_and_ia3, what=L("holds both LoRA and IA3 adapters"),
         where=L("merge_adapter: model.layers.0.self_attn.q_proj"), how=L("Delete the other method's adapters there")),
    Case("a DoRA adapter active beside another on its layer", forward, fp.AdapterError, setup=dora_and_lora,
         what=L("adapters ['a', 'b'] are active on one layer"), where=L("DoRA adapter 'a' runs alone on its layer"),
         how=L("activate only it there (fp.set_active_adapters), or merge the others")),
    Case("a rank-allocator step before backward", lambda m: fp.RankAllocator(m, "a").update_and_allocate(m, 1),
         fp.AdapterError, setup=adalora, what=L("lora_A.a has no gradient"),
         where=L("RankAllocator.update_and_allocate: model.layers.0.self_attn.q_proj"),
         how=L("call it after loss.backward() and before optimizer.zero_grad()")),
    Case("a prompt adapter's attention mask of another length",
         lambda m: forward(m, attention_mask=torch.ones(2, 5)), fp.AdapterError, setup=prompt,
         what=L("attention_mask has shape (2, 5) but the input is (2, 8)"), where=L("prompt tuning (LlamaForCausalLM)"),
         how=L("pass a 2-D mask (batch, sequence) of the input's shape")),
    Case("a prompt after the first token of an empty input", lambda m: m(input_ids=IDS[:, :0]), fp.AdapterError,
         setup=lambda m: fp.add_adapter(m, "p", fp.PromptTuningConfig(prompt_length=2, combine="prefix_after_bos")),
         what=L("needs at least one input token"),
         where=L("prompt tuning (LlamaForCausalLM): combine='prefix_after_bos'"),
         how=L("pass one, or use combine='prefix'")),
    Case("two active prompt adapters that combine differently", forward, fp.AdapterError, setup=two_prompts,
         what=L("combine their prompts differently (['prefix', 'prefix_after_bos'])"),
         where=L("the active adapters ['p', 'q']"), how=L("activate only adapters with one combine mode")),
    Case("a multi-adapter batch while adapters are merged", lambda m: forward(m, adapter_names=["a", "a"]),
         fp.AdapterError, setup=lora_merged, what=L("adapters are merged into the base weights"),
         where=L("adapter_names: ") + ".*" + L("model.layers.0.self_attn.q_proj"),
         how=L("call fp.unmerge_adapter(model) first")),
    Case("generate with fewer adapter names than rows",
         lambda m: m.generate(input_ids=IDS, adapter_names=["a"], max_new_tokens=2), fp.AdapterError, setup=lora,
         what=L("1 adapter name(s) for 2 input row(s)"), where=L("generate(adapter_names=...)"),
         how=L("pass one per row")),
    Case("adapter names for fewer rows than the batch has", lambda m: forward(m, adapter_names=["a"]),
         fp.AdapterError, setup=lora, what=L("1 adapter name(s) for 2 input row(s)"), where=L("adapter_names"),
         how=L("pass one per row")),
    Case("an adapter name in a batch that the model lacks", lambda m: forward(m, adapter_names=["a", "zz"]),
         fp.AdapterError, setup=lora, what=L("no adapter named 'zz'"), where=L("adapter_names"),
         how=L("(adapters: 'a')")),
    Case("adapter ids given as floats", lambda m: batch_run(m, torch.tensor([0.0, 0.0])), fp.AdapterError,
         setup=lora, what=L("got torch.float32"), where=L("adapter_batch"), how=L("expected a 1-D integer tensor")),
    Case("an adapter id that names no adapter", lambda m: batch_run(m, torch.tensor([0, 7])), fp.AdapterError,
         setup=lora, what=L("adapter id 7 at row 1"), where=L("adapter_batch"), how=L("(ids: a=0; -1 for none)")),
    Case("adapter ids on the meta device", lambda m: batch_run(m, torch.tensor([0, 0], device="meta")),
         fp.AdapterError, setup=lora, what=L("meta"), where=L("adapter_batch"), how=L("CPU")),
    Case("a prompt-tuning adapter in a multi-adapter batch", lambda m: batch_run(m, ["p", "a"]), fp.AdapterError,
         setup=lora_and_prompt, what=L("'p' is a PromptTuningConfig"), where=L("adapter_batch"),
         how=L("Run it in its own batch (fp.set_active_adapters)")),
    Case("ejecting the prefix of a LoRA adapter", lambda m: fp.eject_prefix_tuning(m, "a"), fp.AdapterError,
         setup=lora, what=L("'a' is a LoRAConfig, not prefix tuning"), where=L("eject_prefix_tuning"),
         how=L("pass the name of a PrefixTuningConfig adapter (on this model: none)")),
    Case("a rank allocator for a LoRA adapter", lambda m: fp.RankAllocator(m, "a"), fp.ConfigError, setup=lora,
         what=L("'a' is a LoRAConfig"), where=L("RankAllocator"), how=L("drives AdaLoRA adapters (fp.AdaLoRAConfig)")),
    Case("loading a checkpoint under a name the model already has", lambda m: load(m, "good", name="a"),
         fp.AdapterError, setup=lora, what=L("already has an adapter named 'a'"), where=L("load_adapter"),
         how=L("pass another name=... or fp.delete_adapter(model, 'a') first")),
]

OP_CASES = [
    Case("a LoRA down projection made for another layer width", lambda m: lora_op(m, lora_a=A(4, 31)),
         fp.InputError, what=L("lora_a has shape (4, 31)"), where=L("lora_linear"), how=L("expected (r, 32)")),
    Case("a LoRA up projection of another rank", lambda m: lora_op(m, lora_b=B(32, 3)), fp.InputError,
         what=L("lora_b has shape (32, 3)"), where=L("lora_linear"), how=L("expected (32, 4)")),
    Case("integer inputs to lora_linear", lambda m: lora_op(m, x=X(dtype=torch.int64)), fp.InputError,
         what=L("x is torch.int64"), where=L("lora_linear"), how=L("cast it with x.to(torch.float32)")),
    Case("float64 inputs on a float32 weight", lambda m: lora_op(m, x=X(dtype=torch.float64)), fp.InputError,
         what=L("x is torch.float64 and the base weight is torch.float32"), where=L("lora_linear"),
         how=L("(or run under torch.autocast)")),
    Case("a LoRA up projection on the meta device", lambda m: lora_op(m, lora_b=B(device="meta")), fp.InputError,
         what=L("lora_b is on meta but x is on cpu"), where=L("lora_linear"), how=L("lora_b.to(x.device)")),
    Case("a per-rank scale with the wrong length", lambda m: lora_op(m, scale=torch.ones(3)), fp.InputError,
         what=L("scale has shape (3,)"), where=L("lora_linear"), how=L("expected (4,), one entry per rank")),
    Case("a LoRA dropout probability of one", lambda m: lora_op(m, dropout_p=1.0), fp.InputError,
         what=L("dropout_p=1.0 is outside [0, 1)"), where=L("lora_linear"), how=L("use a probability such as 0.05")),
    Case("an IA3 input scale sized for the output", lambda m: fp.ops.ia3_linear(X(), W(m)[:16], None, in_scale=X(16)),
         fp.InputError, what=L("in_scale has shape (16,)"), where=L("ia3_linear"),
         how=L("expected (32,), one entry per input feature")),
    Case("an integer IA3 scale",
         lambda m: fp.ops.ia3_linear(X(), W(m), None, out_scale=torch.ones(32, dtype=torch.int64)),
         fp.InputError, what=L("out_scale must be floating point, got torch.int64"), where=L("ia3_linear"),
         how=L("out_scale.float()")),
    Case("a DoRA magnitude of the wrong length", lambda m: dora_op(m, magnitude=X(31)), fp.InputError,
         what=L("magnitude has shape (31,)"), where=L("dora_linear"), how=L("expected (32,), one entry per output")),
    Case("a DoRA down projection of another width, caught before the norm is computed",
         lambda m: dora_op(m, lora_a=A(4, 31)), fp.InputError, what=L("lora_a has shape (4, 31)"),
         where=L("dora_linear"), how=L("expected (r, 32)")),
    Case("a DoRA magnitude on the meta device", lambda m: dora_op(m, magnitude=X(32, device="meta")), fp.InputError,
         what=L("magnitude is on meta"), where=L("dora_linear"), how=L("magnitude.to(x.device)")),
    Case("a bottleneck residual of another shape", lambda m: bottleneck_op(m, residual=X(2, 3, 16)), fp.InputError,
         what=L("residual has shape (2, 3, 16), x (2, 3, 32)"), where=L("bottleneck_adapter"),
         how=L("pass the sub-layer's input as the residual")),
    Case("integer hidden states to a bottleneck adapter",
         lambda m: bottleneck_op(m, x=X(dtype=torch.int64), residual=X(dtype=torch.int64)), fp.InputError,
         what=L("x is torch.int64"), where=L("bottleneck_adapter"), how=L("x.float()")),
    Case("float64 bottleneck weights on float32 hidden states",
         lambda m: bottleneck_op(m, w_up=X(32, 8, dtype=torch.float64)), fp.InputError,
         what=L("w_up is torch.float64 but x is torch.float32"), where=L("bottleneck_adapter"),
         how=L("w_up.to(x.dtype)")),
    Case("a bottleneck down projection on the meta device", lambda m: bottleneck_op(m, w_down=X(8, 32, device="meta")),
         fp.InputError, what=L("w_down is on meta"), where=L("bottleneck_adapter"), how=L("w_down.to(x.device)")),
    Case("a bottleneck non-linearity the op does not compute", lambda m: bottleneck_op(m, non_linearity="swishh"),
         fp.InputError, what=L("'swishh' is not supported"), where=L("bottleneck_adapter: non_linearity"),
         how=L("use one of gelu")),
    Case("PHM rule matrices that are not square", lambda m: fp.ops.phm_linear(X(), X(2, 2, 3), X(2, 16, 16)),
         fp.InputError, what=L("got (2, 2, 3)"), where=L("phm_linear: rule"), how=L("pass the n rule matrices")),
    Case("PHM inputs of another width", lambda m: fp.ops.phm_linear(X(2, 3, 30), X(2, 2, 2), X(2, 16, 16)),
         fp.InputError, what=L("x has 30 features"), where=L("phm_linear"), how=L("pass x of shape (..., 32)")),
    Case("integer PHM weights", lambda m: fp.ops.phm_linear(X(), X(2, 2, 2), torch.ones(2, 16, 16, dtype=torch.int64)),
         fp.InputError, what=L("got torch.int64"), where=L("phm_linear: w must be floating point"),
         how=L("w.float()")),
    Case("attention queries without a head dimension", lambda m: attention_op(q=X(2, 5, 8)), fp.InputError,
         what=L("q has shape (2, 5, 8)"), where=L("fp.ops.prefix_attention"), how=L(".transpose(1, 2)")),
    Case("query heads that are not a multiple of the key heads", lambda m: attention_op(q=X(2, 3, 5, 8)),
         fp.InputError, what=L("q has 3 heads and k/v 2"), where=L("fp.ops.prefix_attention"),
         how=L("a number of heads that divides 3")),
    Case("integer queries", lambda m: attention_op(q=X(2, 4, 5, 8, dtype=torch.int64)), fp.InputError,
         what=L("q has dtype torch.int64"), where=L("fp.ops.prefix_attention"), how=L("cast q, k and v")),
    Case("float64 keys beside float32 queries",
         lambda m: attention_op(k=X(2, 2, 5, 8, dtype=torch.float64), v=X(2, 2, 5, 8, dtype=torch.float64)),
         fp.InputError, what=L("k has dtype torch.float64 but q has torch.float32"),
         where=L("fp.ops.prefix_attention"), how=L("cast them to one dtype")),
    Case("prefix values on the meta device",
         lambda m: attention_op(prefix_k=X(1, 2, 3, 8), prefix_v=X(1, 2, 3, 8, device="meta")), fp.InputError,
         what=L("prefix_v is on meta but q is on cpu"), where=L("fp.ops.prefix_attention"), how=L("move it to cpu")),
    Case("prefix offsets given as floats",
         lambda m: attention_op(prefix_k=X(1, 2, 3, 8), prefix_v=X(1, 2, 3, 8), prefix_offsets=torch.zeros(2)),
         fp.InputError, what=L("prefix_offsets has dtype torch.float32"), where=L("fp.ops.prefix_attention"),
         how=L(".to(torch.int32)")),
    Case("a row's prefix slice past the packed prefixes",
         lambda m: attention_op(prefix_k=X(1, 2, 3, 8), prefix_v=X(1, 2, 3, 8), prefix_offsets=torch.tensor([0, 5])),
         fp.InputError, what=L("prefix_offsets of row 1 exceeds P = 3"), where=L("fp.ops.prefix_attention"),
         how=L("off + len <= P = 3")),
    Case("a multi-LoRA adapter index out of range", lambda m: multi_lora_op(m, adapter_index=torch.tensor([0, 2, 0])),
         fp.AdapterError, what=L("adapter index 2 at row 1 is out of range"), where=L("multi_lora_linear"),
         how=L("valid indices are 0..1 (and -1 for no adapter)")),
    Case("multi-LoRA adapter indices given as floats",
         lambda m: multi_lora_op(m, adapter_index=torch.tensor([0.0, 1.0, 0.0])), fp.AdapterError,
         what=L("got a torch.float32 tensor"), where=L("multi_lora_linear"), how=L("(e.g. ids.long())")),
    Case("multi-LoRA slots of two dtypes", lambda m: multi_lora_op(m, lora_a=[A(), A(2, dtype=torch.float64)],
                                                                   lora_b=[B(), B(r=2, dtype=torch.float64)]),
         fp.InputError, what=L("slot 1 is torch.float64 and the first adapter torch.float32"),
         where=L("multi_lora_linear"), how=L("(cast the adapters)")),
    Case("a multi-LoRA slot on the meta device",
         lambda m: multi_lora_op(m, lora_a=[A(), A(2, device="meta")], lora_b=[B(), B(r=2, device="meta")]),
         fp.InputError, what=L("slot 1 is on meta"), where=L("multi_lora_linear"), how=L("move them together")),
    Case("multi-LoRA lists of different lengths", lambda m: multi_lora_op(m, lora_b=[B()]), fp.InputError,
         what=L("(got 2, 1 and 2 entries)"), where=L("multi_lora_linear: lora_a, lora_b and scale"),
         how=L("give one entry per slot in each")),
    Case("multi-LoRA adapters made for another layer", lambda m: multi_lora_op(m, lora_a=[A(4, 31)], lora_b=[B()],
                                                                               scale=[1.0]),
         fp.InputError, what=L("the adapters map 31 -> 32 features, the base weight 32 -> 32"),
         where=L("multi_lora_linear"), how=L("pass adapters made for this layer: lora_a (r, 32)")),
    Case("multi-IA3 vectors sized for the input of an output-scaling layer",
         lambda m: fp.ops.multi_ia3_linear(X(3, 16), W(m)[:, :16], None, vectors=[X(16)],
                                           adapter_index=torch.tensor([0, 0, -1])),
         fp.InputError, what=L("the vectors have 16 entries; output scaling of this layer needs 32"),
         where=L("multi_ia3_linear"), how=L("or feedforward=True for vectors that scale the input")),
    Case("multi-IA3 adapter indices with an extra dimension",
         lambda m: multi_ia3_op(m, adapter_index=torch.tensor([[0, 1, -1]])), fp.AdapterError,
         what=L("adapter_index has shape (1, 3)"), where=L("multi_ia3_linear"), how=L("expected (3,) (one per token)")),
    Case("multi-IA3 adapter indices on the meta device",
         lambda m: multi_ia3_op(m, adapter_index=torch.tensor([0, 1, -1], device="meta")), fp.AdapterError,
         what=L("a meta tensor, which holds no values"), where=L("multi_ia3_linear"), how=L("pass them on the CPU")),
]

BACKEND_CASES = [
    Case("a backend name that does not exist", lambda m: fp.ops.use_backend("tritonn").__enter__(), fp.BackendError,
         what=L("'tritonn'"), where=L("use_backend("), how=L("expected one of torch, triton, cuda or 'auto'")),
    Case("FASTPEFT_BACKEND naming no backend", lambda m: with_env(lambda: lora_op(m), FASTPEFT_BACKEND="gpu"),
         fp.BackendError, what=L("'gpu' is not a backend"), where=L("FASTPEFT_BACKEND="),
         how=L("use one of torch, triton, cuda or auto")),
    Case("the CUDA backend forced for an op without a CUDA kernel", lambda m: forced("cuda", lambda: lora_op(m)),
         fp.BackendError, what=L("lora_linear has no CUDA C++ kernel"), where=L("fp.ops.use_backend('cuda')"),
         how=L("force 'triton' or 'torch' instead, or leave the use_backend block")),
    Case("the CUDA backend forced on CPU tensors",
         lambda m: with_env(lambda: multi_lora_op(m), FASTPEFT_BACKEND="cuda"),
         fp.BackendError, what=L("the tensors are on cpu"), where=L("multi_lora_linear: FASTPEFT_BACKEND=cuda"),
         how=L("move them to a CUDA device, or unset FASTPEFT_BACKEND")),
    Case("the Triton backend forced for float64", lambda m: forced("triton", lambda: lora_op(
        m, x=X(dtype=torch.float64), weight=W(m).double(), lora_a=A(dtype=torch.float64),
        lora_b=B(dtype=torch.float64))),
         fp.BackendError, what=L("float64") if HAS_TRITON else L("triton"), where=L("lora_linear: fp.ops.use_backend"),
         how=L("Leave the use_backend block to use the PyTorch reference")),
]

def bad_checkpoint(id: str, kind: str, file: str, what: str, how: str, **kw) -> Case:
    """A row that loads checkpoint(kind) into the model: a CheckpointError whose message names the file."""
    return Case(id, lambda m: load(m, kind), fp.CheckpointError, what=what, where=L(f"{kind}/{file}"), how=how, **kw)


CHECKPOINT_CASES = [
    bad_checkpoint("a truncated safetensors file", "truncated", WEIGHTS,
                   what=L("is not a valid safetensors file"), how=L("save the adapter again")),
    bad_checkpoint("a safetensors file with a corrupted header", "corrupted header", WEIGHTS,
                   what=L("header too large"), how=L("save the adapter again")),
    bad_checkpoint("an adapter config that is not JSON", "unreadable json", CONFIG,
                   what=L("is not readable JSON"), how=L("save the adapter again")),
    bad_checkpoint("a checkpoint folder without adapter_config.json", "no config", CONFIG,
                   what=L("is missing"), how=L("as written by fp.save_adapter or PeftModel.save_pretrained")),
    bad_checkpoint("a checkpoint folder without its weights", "no weights", WEIGHTS,
                   what=L("is missing"), how=L("save the adapter again with fp.save_adapter")),
    Case("saving an adapter under a path that is a file",
         lambda m: fp.save_adapter(m, os.path.join(checkpoint("good"), CONFIG, "a"), "a"), fp.CheckpointError,
         setup=lora, what=L("is not a directory"), where=L(f"good/{CONFIG}"), how=r"pass a folder"),
    Case("a checkpoint path that is not a folder",
         lambda m: fp.load_adapter(m, os.path.join(checkpoint("good"), "nothing-here"), name="x"), fp.CheckpointError,
         what=L("is not a directory"), where=r"nothing-here", how=L("pass the folder that holds adapter_config.json")),
    bad_checkpoint("a checkpoint config with a rank of zero", "rank zero", CONFIG,
                   what=L("LoRAConfig.r: rank must be a positive integer, got 0"), how=L("use e.g. r=8")),
    bad_checkpoint("a checkpoint with a LoRA feature fastpeft lacks", "lora bias", CONFIG,
                   what=L("lora_bias=True"), how=L("Use a LoRA adapter without it (or load it with PEFT)")),
    Case("a LoRA checkpoint loaded into a model with wider layers", lambda m: load(m, "good"), fp.CheckpointError,
         model="wide llama", what=L("has shape (4, 32)") + ".*" + L("is (4, 64)"),
         where=L("model.layers.0.self_attn.q_proj"), how=L("load it into the model it was trained on")),
    bad_checkpoint("a checkpoint of a method fastpeft does not read", "unknown method", CONFIG,
                   what=L("peft_type='LOHA'"), how=r"load it with PEFT"),
    bad_checkpoint("a LoRA config labelled as IA3", "labelled ia3", CONFIG, what=r"peft_type='IA3'.*LoRA",
                   how=r"peft_type"),
    Case("a LoRA checkpoint made for another model family", lambda m: load(m, "good"), fp.CheckpointError,
         model="gpt2", what=L("'q_proj', 'v_proj' matched no module"), where=L(f"good/{CONFIG}"),
         how=r"load it into the base model it was made for"),
    bad_checkpoint("a checkpoint with a tensor its config does not call for", "extra tensor", WEIGHTS,
                   what=L("zz_proj"), how=r"save the adapter again|load (it )?into"),
    bad_checkpoint("a checkpoint that lacks a tensor its config calls for", "missing tensor", WEIGHTS,
                   what=L("q_proj.lora_A.weight"), how=r"save the adapter again"),
    bad_checkpoint("a checkpoint tensor of an integer dtype", "integer tensor", WEIGHTS,
                   what=L("torch.int32"), how=r"save the adapter again"),
]

def through_ddp(call: Callable[[nn.Module], object]) -> Callable[[nn.Module], object]:
    """call(DistributedDataParallel(m)) in a one-process gloo group (torn down again)."""
    def run(m):
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        try:
            return call(DistributedDataParallel(m))
        finally:
            dist.destroy_process_group()
    return run


def full_model_folder() -> str:
    """A folder as transformers writes a whole model (config.json, model.safetensors): no adapter in it."""
    folder = _FILES["root"] / "full model"
    if not folder.exists():
        model("llama").save_pretrained(folder)
    return str(folder)


def trainer_run_without_adapters() -> str:
    """A Trainer output folder whose checkpoint-<step> folders hold a whole model, no adapter."""
    folder = _FILES["root"] / "run"
    if not folder.exists():
        shutil.copytree(full_model_folder(), folder / "checkpoint-2")
    return str(folder)


def two_adapters_first_active(m):
    lora(m)
    fp.add_adapter(m, "b", fp.LoRAConfig(r=2, target_modules=["q_proj"]))


WRAPPER_AND_FOLDER_CASES = [
    Case("adding an adapter to a model already wrapped in DistributedDataParallel",
         through_ddp(lambda d: fp.add_adapter(d, "b", fp.LoRAConfig(r=2, target_modules=["k_proj"]))),
         fp.AdapterError, setup=lora, what=L("DistributedDataParallel synchronises the gradients"),
         where=L("add_adapter:"), how=L("Call fp.add_adapter on the model before wrapping it")),
    Case("loading an adapter into a model already wrapped in DistributedDataParallel",
         through_ddp(lambda d: fp.load_adapter(d, checkpoint("good"), name="x")), fp.AdapterError, setup=lora,
         what=L("DistributedDataParallel synchronises the gradients"), where=L("load_adapter:"),
         how=L("Call fp.load_adapter on the model before wrapping it")),
    Case("switching the trained adapter of a model wrapped in DistributedDataParallel",
         through_ddp(lambda d: fp.set_active_adapters(d, "b")), fp.AdapterError, setup=two_adapters_first_active,
         what=L("DistributedDataParallel synchronises the gradients"), where=L("set_active_adapters:"),
         how=L("then build a new DistributedDataParallel around it")),
    Case("a state dict passed where the model goes", lambda m: fp.save_adapter(m.state_dict(), "unused", "a"),
         fp.AdapterError, setup=lora, what=L("got OrderedDict"), where=L("save_adapter:"),
         how=L("pass the model itself")),
    Case("a whole model's folder loaded as an adapter", lambda m: fp.load_adapter(m, full_model_folder(), name="x"),
         fp.CheckpointError, what=L("adapter_config.json is missing"), where=L("full model/adapter_config.json"),
         how=L("It holds a full model (config.json): load that with from_pretrained")),
    Case("a Trainer run whose checkpoints hold no adapter",
         lambda m: fp.load_adapter(m, trainer_run_without_adapters(), name="x"), fp.CheckpointError,
         what=L("adapter_config.json is missing"), where=L("run/adapter_config.json"),
         how=L("the run saved a model without fastpeft adapters")),
]

CASES = (CONFIG_CASES + TARGET_CASES + ADAPTER_CASES + OP_CASES + BACKEND_CASES + CHECKPOINT_CASES +
         WRAPPER_AND_FOLDER_CASES)


def _param(case: Case):
    marks = [pytest.mark.xfail(strict=True, reason=case.known)] if case.known else []
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_bad_input(case: Case):
    m = base(case.model)
    if case.setup is not None:
        case.setup(m)
    check(case, m)


def test_the_catalogue_lists_sixty_distinct_mistakes():
    ids = [c.id for c in CASES]
    assert len(set(ids)) == len(ids), "two rows share an id"
    assert len({(c.error, c.where, c.what) for c in CASES}) == len(CASES), "two rows check the same message"
    assert len([c for c in CASES if not c.known]) >= 60


def test_the_snapshot_sees_what_a_call_could_change():
    """The harness itself: each kind of change it must catch is caught."""
    changes = [
        lambda m: m.model.layers[0].self_attn.q_proj.weight.data.add_(1),
        lambda m: m.model.layers[0].mlp.register_forward_hook(lambda *a: None),
        lambda m: m.register_forward_pre_hook(lambda *a: None),
        lambda m: m.model.layers[0].self_attn.q_proj.weight.requires_grad_(True),
        lambda m: m.model.layers[1].train(),
        lambda m: setattr(m.model.layers[0].self_attn, "q_proj", nn.Linear(32, 32, bias=False)),
        lambda m: m.model.norm.__dict__.__setitem__("extra", 1),
        lambda m: fp.set_active_adapters(m, None),
    ]
    for change in changes:
        m = base("llama")
        lora(m)
        before = snapshot(m)
        change(m)
        with pytest.raises(AssertionError):
            assert_unchanged(before, snapshot(m))
