"""model.save_pretrained, Trainer's checkpoints and Trainer's resume on a model holding fastpeft adapters.

Installed on each model (per instance, never on transformers' classes) when it gets its first adapter, removed when
it loses its last one (fp.delete_adapter, fp.unload):

- `model.save_pretrained(d)` (also what trainer.save_model(), Trainer's periodic checkpoints and push_to_hub call):
  * no adapter merged: every adapter as fp.save_adapter writes it (PEFT's layout where PEFT has the method,
    AdapterHub's for bottleneck/Compacter adapters), in PEFT's multi-adapter layout: "default" (else the first
    adapter) at the root of d, each other adapter in d/<name>. Then model.safetensors: the adapters' tensors (and
    any base tensor being trained, e.g. bias="all") under the model's own state-dict names, which is what Trainer's
    resume_from_checkpoint and load_best_model_at_end read (for a model that is not a peft.PeftModel, Trainer's
    _load_from_checkpoint reads nothing else: transformers' own PEFT integration cannot resume from its adapter-only
    checkpoints). There is no config.json, as with transformers' own PEFT integration, so from_pretrained never takes
    d for a full model (with peft installed it loads the base named in adapter_config.json, then the adapter).
  * an adapter merged (fp.merge_adapter): the full model, as transformers writes it (config.json, model.safetensors)
    under the original parameter names, with the merged weights; plain from_pretrained reloads it. Refused, with
    what to call, when the saved model would compute differently (an active adapter not merged, an attention-level
    adapter, a modules_to_save copy tied to another weight).
  Adapters and a full model never share a folder (from_pretrained would read both): saving one into a folder that
  holds the other is refused.
- load_state_dict hooks: a state dict carrying RESUME_MARKER (the model.safetensors above) is checked against the
  model's adapters before anything is copied (same adapters, same shapes) and leaves the base weights alone without
  reporting them missing.
"""
from __future__ import annotations

import os
from collections.abc import Callable

import torch
from safetensors import safe_open
from torch import nn

from ..errors import CheckpointError
from ..inject.api import MERGEABLE
from ..inject.state import get_state, require_state
from ..inject.swap import wrappers
from ..inject.wrapped import is_sharded
from ..modules import ModulesToSave
from .files import CONFIG_NAME, clean_name, few, safetensors_bytes, write_atomic
from .folders import adapter_folder
from .gather import host_copies, write_once

MODEL_CONFIG = "config.json"
MODEL_WEIGHTS = "model.safetensors"  # Trainer's SAFE_WEIGHTS_NAME
RESUME_MARKER = "fastpeft_adapter_state"  # a scalar in the resume file's tensors; its value is the format version
RESUME_METADATA = {"format": "pt", "fastpeft": "adapter state for Trainer's resume, not a full model"}
_FULL_MODEL_FILES = (MODEL_CONFIG, MODEL_WEIGHTS, "model.safetensors.index.json", "pytorch_model.bin")


# -------------------------------------------------------------------------------------------------- installing
def install(model: nn.Module, save_adapter: Callable) -> tuple[list, object]:
    """Give the model the hooks and (for a transformers model) the save_pretrained described above."""
    hooks = ResumeHooks()
    handles = [model.register_load_state_dict_pre_hook(hooks.pre_hook),
               model.register_load_state_dict_post_hook(hooks.post_hook)]
    saver = None
    if callable(getattr(type(model), "save_pretrained", None)) and "save_pretrained" not in model.__dict__:
        saver = Saver(model, save_adapter).save_pretrained
        model.__dict__["save_pretrained"] = saver
    return handles, saver


def uninstall(model: nn.Module, installed: tuple[list, object]) -> None:
    handles, saver = installed
    for handle in handles:
        handle.remove()
    if saver is not None and model.__dict__.get("save_pretrained") == saver:
        del model.__dict__["save_pretrained"]


# -------------------------------------------------------------------------------------------------- saving
class Saver:
    """The save_pretrained a model holding fastpeft adapters gets (see the module docstring)."""

    def __init__(self, model: nn.Module, save_adapter: Callable):
        self.model, self.save_adapter = model, save_adapter

    def save_pretrained(self, save_directory: str | os.PathLike, is_main_process: bool = True,
                        state_dict: dict | None = None, push_to_hub: bool = False, **kwargs) -> None:
        """Write the adapters (or, with an adapter merged, the full model) to `save_directory`; see fastpeft's
        checkpoint/hf.py. `state_dict`, when given (Trainer passes a gathered one under FSDP), supplies the tensors
        of model.safetensors; the adapter files are written from the model by fp.save_adapter."""
        model, directory = self.model, os.fspath(save_directory)
        state = require_state(model, "save_pretrained")
        merged = [n for n in state.configs if any(n in getattr(m, "merged_adapters", ()) for _, m in wrappers(model))]
        if merged:
            full = full_state(model, merged, model.state_dict() if state_dict is None else state_dict)
            _refuse_into(directory, CONFIG_NAME, "an adapter checkpoint",
                         "from_pretrained would apply that adapter again on top of the merged weights")
            type(model).save_pretrained(model, directory, is_main_process=is_main_process, state_dict=full,
                                        push_to_hub=push_to_hub, **kwargs)
            return
        if push_to_hub:
            raise CheckpointError("save_pretrained(push_to_hub=True) on a model with fastpeft adapters: call "
                                  "model.push_to_hub(repo_id), which saves the adapters through this save_pretrained "
                                  "and uploads them.")
        if not is_main_process and not is_sharded(model):  # a sharded model is gathered on every rank (gather.py)
            return
        for filename in _FULL_MODEL_FILES:
            _refuse_into(directory, filename, "a full model", "from_pretrained would read that model and the adapter "
                         "files together, and its model.safetensors would be replaced")
        names = list(state.configs)
        for name in names:
            self.save_adapter(model, adapter_folder(directory, name, names), name)
        write_resume_state(model, directory, state_dict)


def _refuse_into(directory: str, filename: str, what: str, why: str) -> None:
    path = os.path.join(directory, filename)
    if os.path.isfile(path) and not (filename == MODEL_WEIGHTS and is_resume_file(path)):
        raise CheckpointError(f"save_pretrained: {directory} already holds {what} ({filename}); {why}. Save into "
                              "another (or an empty) folder.")


def _merged_check(model: nn.Module, merged: list[str]) -> None:
    """Refuse a full save whose reloaded model would compute differently from this one."""
    state = require_state(model, "save_pretrained")
    lead = (f"save_pretrained: adapter {merged[0]!r} is merged into the weights, so save_pretrained writes the full "
            "model (plain from_pretrained reloads it), but")
    for name in state.active:
        if name in merged:
            continue
        method = type(state.configs[name]).__name__
        if state.configs[name].method in MERGEABLE:
            raise CheckpointError(f"{lead} active adapter {name!r} ({method}) is not merged: the saved model would "
                                  f"compute without it. Merge it too (fp.merge_adapter(model, {name!r})), deactivate "
                                  "it (fp.set_active_adapters), or call fp.unmerge_adapter(model) to save the adapters "
                                  "instead.")
        raise CheckpointError(f"{lead} active adapter {name!r} ({method}) cannot be merged into weights, so a full "
                              "checkpoint has no place for it and the reloaded model would compute without it. "
                              "Deactivate it (fp.set_active_adapters) to save the merged model without it, or call "
                              "fp.unmerge_adapter(model) and save_pretrained to save every adapter.")
    if state.attention is not None:
        holders = [n for n, c in state.configs.items() if c.method in ("prefix_tuning", "llama_adapter")]
        raise CheckpointError(f"{lead} the model holds attention-level adapters ({', '.join(holders)}) that switched "
                              "its attention implementation, which the saved config would carry. Delete them "
                              "(fp.delete_adapter) before saving the full model, or call fp.unmerge_adapter(model) "
                              "and save_pretrained to save every adapter.")


def full_state(model: nn.Module, merged: list[str], source: dict) -> dict[str, torch.Tensor]:
    """`source` (the model's state dict) as fp.unload(model, merge=True) would leave it: the original key names,
    the merged base weights, the active modules_to_save copies in place of their originals, no adapter tensors."""
    _merged_check(model, merged)
    layers = wrappers(model)
    paths = {p for p, _ in layers}
    copies = {}  # "<path>.modules_to_save.<name>." -> "<path>." for the copy each ModulesToSave runs
    for path, module in layers:
        running = next((n for n in module.active_adapters if n in module.modules_to_save), None) if isinstance(
            module, ModulesToSave) else None
        if running is not None:
            copies[f"{path}.modules_to_save.{running}."] = f"{path}."
    out, replaced = {}, set()
    for key, value in source.items():
        copy = next((c for c in copies if key.startswith(c)), None)
        if copy is not None:
            out[copies[copy] + key[len(copy):]] = value
            replaced.add(copies[copy] + key[len(copy):])
            continue
        clean = clean_name(key, paths)
        if clean is not None and clean not in replaced:
            out.setdefault(clean, value)
    _check_ties(model, out, replaced, paths)
    return out


def _check_ties(model: nn.Module, out: dict, replaced: set[str], paths: set[str]) -> None:
    """A modules_to_save copy stands in for a weight the model ties to another one (GPT-2's lm_head and wte):
    from_pretrained would tie them again and drop the copy, so refuse."""
    by_storage: dict[tuple, list[str]] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        clean = clean_name(key, paths)
        if clean is not None and isinstance(value, torch.Tensor) and value.device.type != "meta":
            by_storage.setdefault((value.device, value.untyped_storage().data_ptr()), []).append(clean)
    for names in by_storage.values():
        tied = sorted(set(names))
        if len(tied) > 1 and replaced & set(tied):
            raise CheckpointError(f"save_pretrained: the model ties {', '.join(tied)}, and a modules_to_save copy "
                                  f"stands in for {sorted(replaced & set(tied))[0]}; from_pretrained would tie them "
                                  "again and lose the copy. Save the adapters instead (fp.unmerge_adapter(model), "
                                  "then save_pretrained).")


# -------------------------------------------------------------------------------------------------- resuming
def resume_state(model: nn.Module, source: dict | None = None) -> dict[str, torch.Tensor]:
    """What Trainer's resume must restore: every state-dict entry the adapters own and every trainable base tensor,
    under the model's own names; values from `source` where it has them."""
    own = model.state_dict()
    source = own if source is None else source
    paths = {p for p, _ in wrappers(model)}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: source.get(k, v) for k, v in own.items()
            if isinstance(v, torch.Tensor) and (clean_name(k, paths) is None or k in trainable)}


def write_resume_state(model: nn.Module, directory: str, source: dict | None = None) -> None:
    tensors, gathered_on = host_copies(resume_state(model, source), "save_pretrained")
    tensors[RESUME_MARKER] = torch.tensor(1.0)
    write_once(gathered_on, lambda: write_atomic(os.path.join(directory, MODEL_WEIGHTS), safetensors_bytes(
        tensors, metadata=RESUME_METADATA)), "save_pretrained")


def is_resume_file(path: str) -> bool:
    with safe_open(path, "pt") as f:
        return (f.metadata() or {}).get("fastpeft") == RESUME_METADATA["fastpeft"]


class ResumeHooks:
    """load_state_dict hooks: an adapter-state dict (it carries RESUME_MARKER) must fit the model's adapters exactly,
    checked before anything is copied; the base tensors it leaves alone are not reported missing."""

    def __init__(self):
        self.skipped: set[str] | None = None

    def pre_hook(self, module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                 error_msgs) -> None:
        self.skipped = None
        if state_dict.pop(prefix + RESUME_MARKER, None) is None:
            return
        own = module.state_dict()
        paths = {p for p, _ in wrappers(module)}
        given = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        what = f"load_state_dict: this fastpeft adapter state (model.safetensors of save_pretrained or a Trainer " \
               f"checkpoint) does not fit this {type(module).__name__}:"
        unknown = sorted(set(given) - set(own))
        if unknown:
            held = ", ".join(repr(n) for n in (get_state(module).configs if get_state(module) else ())) or "none"
            raise CheckpointError(f"{what} {len(unknown)} tensor(s) match nothing in the model, e.g. "
                                  f"{few(unknown, prefix)}. It was saved with adapters this model lacks (the model "
                                  f"holds {held}): add the same adapters (fp.add_adapter with the same names and "
                                  "configs) before resuming.")
        missing = sorted(k for k in own if clean_name(k, paths) is None and k not in given)
        if missing:
            raise CheckpointError(f"{what} it lacks {len(missing)} tensor(s) of the model's adapters, e.g. "
                                  f"{few(missing, prefix)}: the model holds adapters the checkpoint was saved without; "
                                  "delete them (fp.delete_adapter) or resume from a checkpoint of these adapters.")
        for key, value in given.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise CheckpointError(f"{what} tensor {prefix + key!r} has shape {tuple(value.shape)}, the model's is "
                                      f"{tuple(own[key].shape)}: the adapter was saved with another configuration "
                                      "(r, target modules, ...); add it with the configuration it was trained with.")
        self.skipped = {prefix + k for k in own if k not in given}

    def post_hook(self, module, incompatible) -> None:
        skipped, self.skipped = self.skipped, None
        if skipped:
            incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in skipped]
