"""Item encoder families behind one registry: adding a family is adding one file here.

Each module of this package that defines an encoder decorates its class with
``@register_encoder("<name>")``. Modules are imported on first lookup, so that importing the
registry stays cheap and a new family needs no edit anywhere else.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from pathlib import Path

from pipeline.encoders.base import Encoder, read_card

_REGISTRY: dict[str, type[Encoder]] = {}


def register_encoder(name: str) -> Callable[[type[Encoder]], type[Encoder]]:
    """Class decorator: register an ``Encoder`` subclass under ``name`` (and set its ``name``)."""

    def decorate(cls: type[Encoder]) -> type[Encoder]:
        if not (isinstance(cls, type) and issubclass(cls, Encoder)):
            raise TypeError(f"@register_encoder({name!r}) needs an Encoder subclass, got {cls!r}")
        known = _REGISTRY.get(name)
        if known is not None and known.__qualname__ != cls.__qualname__:
            raise ValueError(f"encoder {name!r} is already registered by {known.__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def _discover() -> None:
    """Import every public module of this package (helpers too) so that decorators run."""
    for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


def list_encoders() -> list[str]:
    """The names of all registered encoder families, sorted."""
    _discover()
    return sorted(_REGISTRY)


def get_encoder(name: str) -> type[Encoder]:
    """The encoder class registered as ``name``; unknown names list the known ones."""
    if name not in _REGISTRY:
        _discover()
    if name not in _REGISTRY:
        raise ValueError(f"unknown encoder {name!r}; known encoders: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def load_encoder(weights_dir: str | Path) -> Encoder:
    """Load whichever encoder family a weights folder's card names, offline."""
    return get_encoder(read_card(weights_dir)["encoder"]).load(weights_dir)


__all__ = ["Encoder", "get_encoder", "list_encoders", "load_encoder", "register_encoder"]
