"""Params sections read strictly: unknown keys and bad values fail fast naming the key.

The whole file is checked once, before any stage work, by ``stages.schema.load_params``; the
helpers here map one section onto its config dataclass for the stage that reads it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

DEFAULT_PARAMS = Path("params.yaml")
SOURCE = str(DEFAULT_PARAMS)  # the file named in messages when the caller does not say which


class ParamsError(ValueError):
    """The params file holds a key or value lmmrec cannot use."""


def closest(name: str, allowed: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the allowed name nearest to a misspelt ``name``, else ''."""
    match = difflib.get_close_matches(str(name), [str(a) for a in allowed], n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def require(params: dict[str, Any], key: str, allowed: Iterable[str] | None = None) -> Any:
    """Return ``params[key]`` (dotted keys allowed); check it against ``allowed`` if given."""
    value: Any = params
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ParamsError(f"{SOURCE}: missing key {key!r}")
        value = value[part]
    if allowed is not None:
        allowed = sorted(allowed)
        if value not in allowed:
            raise ParamsError(
                f"{SOURCE}: {key} = {value!r} is not allowed{closest(value, allowed)}; "
                f"allowed: {allowed}"
            )
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
            f"{SOURCE}: {where}.{model}.train should be a mapping of train settings "
            f"(e.g. batch_size: 2048), got {train!r}"
        )
    return mapping, train


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` checked against the type ``hint`` (ints and float-like strings become floats
    where a float is expected: YAML 1.1 reads ``1e-3`` as a string); raises naming ``key``."""
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
            raise ParamsError(f"{key} = {value!r} should be a list")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{key} = {value!r} should be a mapping")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{key} = {value!r} should be true or false")
        return value
    if hint is float:
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if math.isfinite(number):
                return number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{key} = {value!r} should be a number")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{key} = {value!r} should be an integer")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ParamsError(f"{key} = {value!r} should be a string")
        return value
    return value


def check_section(
    cls: type,
    mapping: Mapping[str, Any] | None,
    section: str,
    source: str = SOURCE,
    fixed: Mapping[str, str] | None = None,
    partial: bool = False,
) -> dict[str, Any]:
    """The keys of one params section, type-checked against the dataclass ``cls``.

    Unknown keys raise with the closest allowed name, and so do ``fixed`` fields (set from
    elsewhere: field -> where); unless ``partial`` (an overrides section), fields without a
    default must be present. Returns the values, coerced to the field types.
    """
    if mapping is not None and not isinstance(mapping, dict):
        raise ParamsError(f"{source}: {section} should be a mapping, got {mapping!r}")
    mapping = dict(mapping or {})
    fixed = dict(fixed or {})
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields if f.name not in fixed]
    prefix = f"{section}." if section else ""
    for key in mapping:
        if key in fixed:
            raise ParamsError(f"{source}: {prefix}{key} cannot be set here: {fixed[key]}")
    unknown = [key for key in mapping if key not in names]
    if unknown:
        listed = ", ".join(f"{prefix}{k}{closest(k, names)}" for k in unknown)
        raise ParamsError(
            f"{source}: unknown key(s) {listed}; allowed in {section or 'the file'}: {names}"
        )
    if not partial:
        missing = [
            f.name
            for f in fields
            if f.name not in fixed and f.name not in mapping
            and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]  # fmt: skip
        if missing:
            raise ParamsError(f"{source}: missing key(s) {[prefix + k for k in missing]}")
    hints = typing.get_type_hints(cls)
    try:
        return {k: _coerce(v, hints[k], prefix + k) for k, v in mapping.items()}
    except ParamsError as exc:
        raise ParamsError(f"{source}: {exc}") from None


def construct(
    cls: type[T], values: Mapping[str, Any], section: str, source: str = SOURCE, **overrides: Any
) -> T:
    """``cls(**values, **overrides)``; its own range checks' errors name ``section``."""
    try:
        return cls(**{**values, **overrides})
    except (TypeError, ValueError) as exc:
        raise ParamsError(f"{source}: {section + ': ' if section else ''}{exc}") from exc


def build(cls: type[T], mapping: dict[str, Any] | None, section: str, **overrides: Any) -> T:
    """Build the frozen config dataclass ``cls`` from one params section.

    Unknown keys raise with the allowed ones; values are type-checked against the field hints;
    missing keys take the dataclass defaults. ``overrides`` (e.g. the global seed) win.
    """
    return construct(cls, check_section(cls, mapping, section, partial=True), section, **overrides)


def training_seeds(params: dict[str, Any]) -> list[int]:
    """The training seeds the train, train_id and e2e matrices run over (``seeds``, default
    ``[seed]``); the data split stays fixed by the global ``seed``."""
    seeds = params.get("seeds")
    return [require(params, "seed")] if seeds is None else list(seeds)


def train_config(
    cls: type[T], params: dict[str, Any], *overrides: dict[str, Any], seed: int | None = None
) -> T:
    """The training config ``cls`` (the trainer's TrainConfig, passed in so that this module,
    which every stage imports, imports no library code) from the `train` section with
    ``overrides`` over it in order (e.g. a model's ``recommenders.<model>.train``) and
    eval.topk; ``seed`` is the run's training seed (initialisation, sampling, dropout), by
    default the first of ``seeds``."""
    topk = tuple(require(params, "eval.topk"))
    train = {**(params.get("train") or {})}
    for mapping in overrides:
        train.update(mapping)
    seed = training_seeds(params)[0] if seed is None else seed
    return build(cls, train, "train", seed=seed, topk=topk)


def encoder_section(
    section: dict[str, Any], encoder: str, encoders: Iterable[str], name: str
) -> dict[str, Any]:
    """The params section ``name`` for ``encoder``: shared keys, overridden by the mapping
    under the encoder's own name (e.g. ``finetune.vlmo.lr``); the mappings of the other
    ``encoders`` dropped."""
    encoders = set(encoders)
    shared = {k: v for k, v in section.items() if k not in encoders}
    own = section.get(encoder) or {}
    if not isinstance(own, dict):
        raise ParamsError(f"{name}.{encoder} must be a mapping of settings, got {own!r}")
    return {**shared, **own}
