"""Name -> class registries (methods, regularizers, attacks) and the typed-config base they share."""

from __future__ import annotations

import dataclasses
import difflib
from typing import ClassVar, Generic, TypeVar

from .config import build_config

T = TypeVar("T")


class Configurable:
    """A component with a lowercase ``name``, a one-line ``description`` and a dataclass
    ``config_class`` validated in its ``__post_init__``."""

    name: ClassVar[str]
    description: ClassVar[str]
    config_class: ClassVar[type]
    kind: ClassVar[str] = "component"

    def __init__(self, config=None):
        self.config = config if config is not None else self.config_class()

    @classmethod
    def from_options(cls, options: dict | None = None, limits: bool = True):
        """Build from ``key=value`` strings or plain values; unknown keys list the valid ones
        (``limits``: see ``build_config``)."""
        return cls(build_config(cls.config_class, options, owner=f"{cls.kind} {cls.name!r}", limits=limits))


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._classes: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> type[T]:
        name = getattr(cls, "name", "")
        if not name or name != name.lower():
            raise ValueError(f"A {self.kind} name must be lowercase and non-empty, got {name!r}")
        if name in self._classes:
            raise ValueError(f"{self.kind.capitalize()} {name!r} is registered twice "
                             f"({self._classes[name].__module__} and {cls.__module__}).")
        if not dataclasses.is_dataclass(cls.config_class):
            raise TypeError(f"{cls.__name__}.config_class must be a dataclass")
        self._classes[name] = cls
        return cls

    def get(self, name: str) -> type[T]:
        if name not in self._classes:
            near = difflib.get_close_matches(name, self._classes, n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise ValueError(f"Unknown {self.kind} {name!r}.{hint} Available: {', '.join(sorted(self._classes))}.")
        return self._classes[name]

    def __contains__(self, name: str) -> bool:
        return name in self._classes

    def __iter__(self):
        return iter(sorted(self._classes))

    def items(self):
        return sorted(self._classes.items())
