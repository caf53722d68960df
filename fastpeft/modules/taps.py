"""`Tap`: a value one forward hook hands to another during one forward call (a module's input read again at another
module's output). It is kept per thread, never on the module, so two threads running one model never read each
other's. A thread-local (not a context variable) because both hooks run inside one synchronous forward call, where
no other task can interleave, and because torch.compile traces thread-local reads and writes (it cannot trace
ContextVar.get)."""
from __future__ import annotations

import threading

_values = threading.local()


class Tap:
    """One slot: put() in a pre-hook, get() or take() in a later hook of the same call."""

    def _slots(self) -> dict:
        slots = getattr(_values, "slots", None)
        if slots is None:
            slots = _values.slots = {}
        return slots

    def put(self, value) -> None:
        self._slots()[self] = value

    def get(self):
        return self._slots().get(self)

    def take(self):
        """The value, and the slot emptied (the tensor is not kept past its call)."""
        return self._slots().pop(self, None)
