"""Exceptions raised by fastpeft. Every message says what was wrong, where, and how to fix it."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class FastPEFTError(Exception):
    """Base class of every error fastpeft raises on purpose."""


class ConfigError(FastPEFTError, ValueError):
    """A config field holds a value fastpeft cannot use."""


class TargetError(FastPEFTError, ValueError):
    """Target modules that match nothing, or match modules fastpeft cannot wrap."""


class AdapterError(FastPEFTError, ValueError):
    """An adapter operation that does not fit the model's adapter state (unknown name, merged twice, ...)."""


class CheckpointError(FastPEFTError, ValueError):
    """A checkpoint that is corrupted or does not fit the model."""


class BackendError(FastPEFTError, RuntimeError):
    """A backend was requested that cannot run these inputs here."""


class InputError(FastPEFTError, ValueError, TypeError):
    """A tensor or argument given to an op (fp.ops.*) with a shape, dtype or device the op cannot take. It is a
    ValueError (a shape, a device) and a TypeError (a dtype) both, as the ops raised before it existed."""


def closest(name: str, candidates: Iterable[str], n: int = 5) -> str:
    """A short human list of the candidates closest to `name`, for 'did you mean' hints."""
    candidates = sorted(set(candidates))
    hits = difflib.get_close_matches(name, candidates, n=n, cutoff=0.4)
    if not hits:
        hits = candidates[:n]
    more = "" if len(candidates) <= len(hits) else f" (of {len(candidates)})"
    return ", ".join(repr(h) for h in hits) + more
