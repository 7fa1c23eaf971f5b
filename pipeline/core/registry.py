"""Named registries that fill themselves from one package: adding an entry is adding a file."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Classes of one kind by name. Modules of ``package`` register theirs with a decorator
    (``@register_<kind>("name")``); the names are read from the modules' source and a lookup
    imports only the module that declares the name, so that listing the names (a params check)
    costs no heavy import (open_clip, torchvision)."""

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

    def _modules(self) -> list[str]:
        package = importlib.import_module(self.package)
        return [
            f"{self.package}.{m.name}"
            for m in pkgutil.iter_modules(package.__path__)
            if not m.name.startswith("_")
        ]

    @cached_property
    def _declared(self) -> dict[str, str]:
        """{name: module} for every ``@register_...("name")`` decorator in the package's
        modules, read without importing them."""
        declared = {}
        for module in self._modules():
            path = Path(importlib.util.find_spec(module).origin)
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef):
                    for deco in node.decorator_list:
                        if (
                            isinstance(deco, ast.Call)
                            and isinstance(deco.func, ast.Name)
                            and deco.func.id.startswith("register_")
                            and len(deco.args) == 1
                            and isinstance(deco.args[0], ast.Constant)
                        ):
                            declared[deco.args[0].value] = module
        return declared

    def _discover(self) -> None:
        for module in self._modules():
            importlib.import_module(module)

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted(set(self._declared) | set(self._classes))

    def module(self, name: str) -> str:
        """The module that declares ``name`` (read from the package's source, nothing is
        imported); an unknown name lists the known ones."""
        if name not in self._declared:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {self.names()}")
        return self._declared[name]

    def get(self, name: str) -> T:
        """The class registered as ``name``; an unknown name lists the known ones."""
        if name not in self._classes and name in self._declared:
            importlib.import_module(self._declared[name])
        if name not in self._classes:
            self._discover()
        if name not in self._classes:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {sorted(self._classes)}")
        return self._classes[name]
