"""Named registries that fill themselves from one package: adding an entry is adding a file."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Classes of one kind by name. Modules of ``package`` register theirs with a decorator and
    are imported on first lookup, so that importing the registry stays cheap."""

    def __init__(self, kind: str, base: T, package: str) -> None:
        self.kind = kind
        self.base = base
        self.package = package
        self._classes: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: register a ``base`` subclass under ``name`` and set its ``name``."""

        def decorate(cls: T) -> T:
            if not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise TypeError(
                    f"register {self.kind} {name!r}: needs a subclass of {self.base.__name__}, "
                    f"got {cls!r}"
                )
            known = self._classes.get(name)
            same = known is not None and (known.__module__, known.__qualname__) == (
                cls.__module__,
                cls.__qualname__,
            )
            if known is not None and not same:
                raise ValueError(f"{self.kind} {name!r} is already registered by {known!r}")
            cls.name = name
            self._classes[name] = cls
            return cls

        return decorate

    def _discover(self) -> None:
        package = importlib.import_module(self.package)
        for module in pkgutil.iter_modules(package.__path__):
            if not module.name.startswith("_"):
                importlib.import_module(f"{self.package}.{module.name}")

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        self._discover()
        return sorted(self._classes)

    def get(self, name: str) -> T:
        """The class registered as ``name``; an unknown name lists the known ones."""
        if name not in self._classes:
            self._discover()
        if name not in self._classes:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {sorted(self._classes)}")
        return self._classes[name]
