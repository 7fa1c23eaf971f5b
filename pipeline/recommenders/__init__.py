"""The recommender registry: one module per model in this package, each registering itself.

Adding a model is adding one file here whose class is decorated with
``@register_recommender("name")``; the modules are imported on first lookup.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

from pipeline.recommenders.base import ItemFeatures, Recommender

__all__ = [
    "ItemFeatures",
    "Recommender",
    "get_recommender",
    "list_recommenders",
    "register_recommender",
]

_REGISTRY: dict[str, type[Recommender]] = {}
_NOT_MODELS = {"base"}


def register_recommender(name: str) -> Callable[[type[Recommender]], type[Recommender]]:
    """Class decorator: register a Recommender subclass under ``name``."""

    def decorate(cls: type[Recommender]) -> type[Recommender]:
        if not (isinstance(cls, type) and issubclass(cls, Recommender)):
            raise TypeError(f"@register_recommender({name!r}) expects a Recommender subclass")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"recommender {name!r} is already registered by {_REGISTRY[name]}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def _import_models() -> None:
    """Import every model module of this package so that their decorators run."""
    for module in pkgutil.iter_modules(__path__):
        if module.name not in _NOT_MODELS and not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


def list_recommenders() -> list[str]:
    """Names of the registered recommenders, sorted."""
    _import_models()
    return sorted(_REGISTRY)


def get_recommender(name: str) -> type[Recommender]:
    """The Recommender class registered as ``name``; unknown names list the known ones."""
    _import_models()
    if name not in _REGISTRY:
        raise ValueError(f"unknown recommender {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name]
