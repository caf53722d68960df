"""Folders that hold several adapters, and the folders transformers' Trainer writes.

PEFT's layout for several adapters (PeftModel.save_pretrained): one adapter at the root, each other one in a
subfolder named after it. model.save_pretrained on a fastpeft model writes "default" at the root (else the first
adapter added) and the others in subfolders. Trainer writes such a folder to output_dir (trainer.save_model()) and
to output_dir/checkpoint-<step> (periodic checkpoints).
"""
from __future__ import annotations

import os
import re

from .files import CONFIG_NAME

ROOT_ADAPTER = "default"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")  # Trainer's PREFIX_CHECKPOINT_DIR-<global step>


def root_adapter(names: list[str]) -> str:
    """The adapter that goes to the root of a multi-adapter folder."""
    return ROOT_ADAPTER if ROOT_ADAPTER in names else names[0]


def adapter_folder(directory: str, name: str, names: list[str]) -> str:
    """Where adapter `name` of a model holding `names` goes in a multi-adapter folder."""
    return directory if name == root_adapter(names) else os.path.join(directory, name)


def holds_adapter(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, CONFIG_NAME))


def last_checkpoint(directory: str) -> str | None:
    """The checkpoint-<step> subfolder with the highest step that holds an adapter (None: none does)."""
    steps = [(int(m.group(1)), entry) for entry in os.listdir(directory)
             if (m := _CHECKPOINT.fullmatch(entry)) and holds_adapter(os.path.join(directory, entry))]
    return os.path.join(directory, max(steps)[1]) if steps else None


def resolve(directory: str, name: str) -> str:
    """The folder fp.load_adapter reads adapter `name` from, given a folder a user passed: its subfolder `name` when
    that holds an adapter (a multi-adapter folder), else the folder itself; a Trainer output folder without a final
    save_model() stands for its last checkpoint-<step>."""
    if not os.path.isdir(directory) or os.path.basename(name) != name or name in ("", ".", ".."):
        return directory
    if not holds_adapter(directory) and not holds_adapter(os.path.join(directory, name)):
        directory = last_checkpoint(directory) or directory
    inner = os.path.join(directory, name)
    return inner if holds_adapter(inner) else directory
