"""AdapterConfig: what every method's config shares (validation on creation, dict round trip, aliases)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import ConfigError, closest


@dataclass
class AdapterConfig:
    """Base of every fastpeft config: validation, dict round trip and aliases."""

    method: ClassVar[str] = ""
    aliases: ClassVar[dict[str, str]] = {}

    def validate(self) -> None:  # overridden per method
        pass

    def to_dict(self) -> dict[str, Any]:
        """Canonical field names only; JSON-serialisable."""
        out = {"method": self.method}
        for f in dataclasses.fields(self):
            if f.name in self.aliases:
                continue
            value = getattr(self, f.name)
            out[f.name] = sorted(value) if isinstance(value, set) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        data = {k: v for k, v in data.items() if k != "method"}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            known = sorted(names - set(cls.aliases))
            raise ConfigError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)} (closest: "
                              f"{closest(unknown[0], known, n=3)}); rename or drop them, the known fields are "
                              f"{', '.join(known)}.")
        return cls(**data)

    def _apply_aliases(self) -> None:
        for alias, canonical in self.aliases.items():
            value = getattr(self, alias)
            if value is None:
                continue
            default = next(f.default for f in dataclasses.fields(self) if f.name == canonical)
            if getattr(self, canonical) != default and getattr(self, canonical) != value:
                raise ConfigError(f"{type(self).__name__}: both {canonical}={getattr(self, canonical)!r} and its "
                                  f"alias {alias}={value!r} were given; pass only one.")
            setattr(self, canonical, value)
            setattr(self, alias, None)

    def __post_init__(self) -> None:
        self._apply_aliases()
        self.validate()
