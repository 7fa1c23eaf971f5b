"""params.yaml, read strictly: unknown keys and bad values fail fast naming the key."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

DEFAULT_PARAMS = Path("params.yaml")


class ParamsError(ValueError):
    """params.yaml holds a key or value lmmrec cannot use."""


def load_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """Read params.yaml as a plain mapping."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path} not found: run from the project root or pass --params")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    return data


def require(params: dict[str, Any], key: str, allowed: typing.Iterable[str] | None = None) -> Any:
    """Return ``params[key]`` (dotted keys allowed); check it against ``allowed`` if given."""
    value: Any = params
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ParamsError(f"params.yaml: missing key {key!r}")
        value = value[part]
    if allowed is not None:
        allowed = sorted(allowed)
        if value not in allowed:
            raise ParamsError(f"params.yaml: {key} = {value!r} is not allowed; allowed: {allowed}")
    return value


def model_settings(
    section: dict[str, Any] | None, model: str, where: str = "recommenders"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``section[model]`` split into the model's hyperparameters and its own overrides of the
    ``train`` settings (its ``train`` key, e.g. a graph model's batch size)."""
    mapping = dict((section or {}).get(model) or {})
    train = mapping.pop("train", None) or {}
    if not isinstance(train, dict):
        raise ParamsError(
            f"params.yaml: {where}.{model}.train should be a mapping of train settings "
            f"(e.g. batch_size: 2048), got {train!r}"
        )
    return mapping, train


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ParamsError as exc:
                errors.append(str(exc))
        raise ParamsError(errors[0])
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"params.yaml: {key} = {value!r} should be a list")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"params.yaml: {key} = {value!r} should be a mapping")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"params.yaml: {key} = {value!r} should be true or false")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"params.yaml: {key} = {value!r} should be a number")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"params.yaml: {key} = {value!r} should be an integer")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ParamsError(f"params.yaml: {key} = {value!r} should be a string")
        return value
    return value


def build(cls: type[T], mapping: dict[str, Any] | None, section: str, **overrides: Any) -> T:
    """Build the frozen config dataclass ``cls`` from one params.yaml section.

    Unknown keys raise with the allowed ones; values are type-checked against the field hints;
    missing keys take the dataclass defaults. ``overrides`` (e.g. the global seed) win.
    """
    if mapping is not None and not isinstance(mapping, dict):
        raise ParamsError(f"params.yaml: {section} should be a mapping, got {mapping!r}")
    mapping = dict(mapping or {})
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(mapping) - set(names))
    if unknown:
        raise ParamsError(
            f"params.yaml: unknown key(s) {[f'{section}.{k}' for k in unknown]}; "
            f"allowed in {section}: {names}"
        )
    values = {k: _coerce(v, hints[k], f"{section}.{k}") for k, v in mapping.items()}
    values.update(overrides)
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ParamsError(f"params.yaml: {section}: {exc}") from exc
