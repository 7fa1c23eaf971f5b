"""The schema of the whole params file, checked when it is loaded, before any stage work.

Each top-level section is the frozen config dataclass its stage builds (defaults live there);
the non-section keys are ``TopLevel``. Unknown sections and keys raise with the closest
allowed name, model names are checked against the recommender registry and each model's
hyperparameters against its own config, and every override section (``<section>.<encoder>``,
``recommenders.<model>.train``, ``e2e.train``, ``e2e.recommenders.<model>``) is checked merged
over what it overrides, as the stages merge it. Messages name the file read and the dotted key.

Only the CLI loads params through here: it is a gate, not a computation, so the stages (and
their DVC deps) see plain mappings and the values DVC tracks stay as written in the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.data.datasets import BUILTIN, DatasetSpec
from pipeline.data.demo.corpus import CorpusConfig
from pipeline.data.demo.shop import DemoConfig
from pipeline.data.download import DownloadConfig
from pipeline.data.preprocess import PreprocessConfig
from pipeline.data.sources import get_source, list_sources
from pipeline.encoders import list_encoders
from pipeline.encoders.base import BASELINE
from pipeline.encoders.cnn_pretrain import CnnPretrainConfig
from pipeline.encoders.pairtrain import PairTrainConfig
from pipeline.encoders.pretrain import EncoderSpec
from pipeline.features.extract import ExtractConfig
from pipeline.recommenders import get_recommender, list_recommenders
from pipeline.report.significance import ReportConfig
from pipeline.training.e2e import E2EConfig
from pipeline.training.evaluation import check_topk
from pipeline.training.trainer import TrainConfig
from stages.params import (
    DEFAULT_PARAMS,
    ParamsError,
    check_section,
    closest,
    construct,
    training_seeds,
)

# TrainConfig fields that come from elsewhere, in `train` and every override of it
TRAIN_FIXED = {
    "seed": "the training seeds are `seeds` (default [seed])",
    "topk": "the cut-offs are eval.topk",
}
E2E_OVERRIDES = ("train", "recommenders")  # e2e sub-sections that override shared sections


@dataclass(frozen=True)
class TopLevel:
    """The params file's keys that are not sections."""

    dataset: str  # a built-in dataset of pipeline.data.datasets, or one listed under `datasets`
    encoder: str  # the large multi-modal encoder under study
    seed: int  # the data split (and the training seed when `seeds` is absent)
    models: tuple[str, ...]  # recommenders that read item features, one run per feature set
    id_models: tuple[str, ...]  # ID-only references, trained once
    seeds: tuple[int, ...] | None = None  # training seeds; None: [seed]
    e2e_seeds: tuple[int, ...] | None = None  # the seeds e2e runs with, some of them; None: all

    def __post_init__(self) -> None:
        for key in ("seeds", "e2e_seeds"):
            if getattr(self, key) is not None and not getattr(self, key):
                raise ValueError(f"{key} = []; list at least one training seed (or leave it out)")


@dataclass(frozen=True)
class EvalConfig:
    """The `eval` section: the cut-offs every evaluation reports."""

    topk: tuple[int, ...]

    def __post_init__(self) -> None:
        check_topk(self.topk)


@dataclass(frozen=True)
class Section:
    """A top-level section: the dataclass it builds, the fields set from elsewhere (field ->
    where), whether it must be present and whether ``<section>.<encoder>`` maps override it."""

    cls: type
    fixed: Mapping[str, str] = field(default_factory=dict)
    required: bool = False
    per_encoder: bool = False


def sections(encoder: str | None = None) -> dict[str, Section]:
    """Every top-level section that builds a config dataclass, by name (``recommenders``
    holds one per model); the ``encoder`` under study and the baseline need their
    architecture x weights sections."""
    specs = {
        name: Section(EncoderSpec, required=name in (encoder, BASELINE)) for name in list_encoders()
    }
    return {
        "demo": Section(DemoConfig),
        "download": Section(DownloadConfig),
        "preprocess": Section(PreprocessConfig, {"seed": "the split is seeded by `seed`"}),
        **specs,
        "pretrain_corpus": Section(CorpusConfig),
        "weights": Section(PairTrainConfig),
        "cnn_weights": Section(CnnPretrainConfig),
        "finetune": Section(PairTrainConfig, per_encoder=True),
        "extract": Section(ExtractConfig),
        "train": Section(TrainConfig, TRAIN_FIXED),
        "e2e": Section(E2EConfig, per_encoder=True),
        "eval": Section(EvalConfig, required=True),
        "report": Section(ReportConfig),
    }


def load_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """Read the params file and check all of it; the mapping as written, with float-like
    strings (YAML 1.1 reads ``1e-3`` as one) turned into floats where a float is expected."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path} not found: run from the project root or pass --params")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from exc
    return validate(data or {}, str(path))


def validate(data: Any, source: str = str(DEFAULT_PARAMS)) -> dict[str, Any]:
    """Check a whole params mapping against the schema (``source`` names it in messages);
    return it with float-like strings turned into floats where a float is expected."""
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: expected a mapping of keys and sections, got {data!r}")
    top_names = list(TopLevel.__dataclass_fields__)
    encoder = data.get("encoder")
    specs = sections(encoder if isinstance(encoder, str) else None)
    allowed = [*top_names, "datasets", "recommenders", *specs]
    unknown = [key for key in data if key not in allowed]
    if unknown:
        listed = ", ".join(f"{k!r}{closest(k, allowed)}" for k in unknown)
        raise ParamsError(f"{source}: unknown top-level key(s) {listed}; allowed: {allowed}")
    top = {k: data[k] for k in top_names if k in data}
    values = check_section(TopLevel, top, "", source)
    out = {**data, **_as_written(top, values)}
    if "datasets" in data:
        out["datasets"] = _datasets(data["datasets"], source)
    _check_top_level(construct(TopLevel, values, "", source), out.get("datasets") or {}, source)
    for name in ("recommenders", *(n for n, spec in specs.items() if spec.required)):
        if name not in data:
            raise ParamsError(f"{source}: missing section {name!r}")
    for name, spec in specs.items():
        if name in data and name not in ("train", "e2e"):
            out[name] = _section(data[name], spec, name, source)

    recommenders = _recommenders(data["recommenders"], source)
    out["recommenders"] = {m: _joined(own, train) for m, (own, train) in recommenders.items()}
    out["train"] = _section(data.get("train"), specs["train"], "train", source)
    train_cfg = {"seed": values["seed"], "topk": tuple(out["eval"]["topk"])}
    construct(TrainConfig, out["train"], "train", source, **train_cfg)
    for model, (_, train) in recommenders.items():
        where = f"recommenders.{model}.train"
        construct(TrainConfig, {**out["train"], **train}, where, source, **train_cfg)
    if "e2e" in data:
        out["e2e"] = _e2e(data["e2e"], out, recommenders, train_cfg, source)
    return out


def _datasets(mapping: Any, source: str) -> dict[str, dict[str, Any]]:
    """``datasets``: name -> entry, each checked against DatasetSpec and its source's rules."""
    if not isinstance(mapping, dict):
        raise ParamsError(
            f"{source}: datasets should be a mapping of dataset names, got {mapping!r}"
        )
    out = {}
    for name, entry in mapping.items():
        where = f"datasets.{name}"
        values = check_section(DatasetSpec, entry, where, source)
        spec = construct(DatasetSpec, values, where, source)
        _choice(spec.source, list_sources(), f"{where}.source", source)
        try:
            get_source(spec.source).check(str(name), spec)
        except ValueError as exc:
            raise ParamsError(f"{source}: {exc}") from None
        out[name] = _as_written(entry, values)
    return out


def _check_top_level(top: TopLevel, datasets: Mapping[str, Any], source: str) -> None:
    """Dataset (built in or listed in ``datasets``) and encoder known; models registered,
    feature-reading in ``models`` and ID-only in ``id_models``, none twice; training seeds
    distinct, e2e's among them."""
    _choice(top.dataset, sorted({*BUILTIN, *datasets}), "dataset", source)
    _choice(top.encoder, list_encoders(), "encoder", source)
    seeds = training_seeds({"seed": top.seed, "seeds": top.seeds})
    for key, listed in (("seeds", top.seeds), ("e2e_seeds", top.e2e_seeds)):
        if listed is not None and len(set(listed)) != len(listed):
            raise ParamsError(f"{source}: {key} = {list(listed)} repeats a seed; list each once")
    outside = sorted(set(top.e2e_seeds or ()) - set(seeds))
    if outside:
        raise ParamsError(
            f"{source}: e2e_seeds {outside} not in seeds {seeds}: e2e warm-starts from the "
            "same seed's run on the pretrained features"
        )
    lists = (
        ("models", top.models, True, "list it in id_models"),
        ("id_models", top.id_models, False, "list it in models"),
    )
    for key, names, features, hint in lists:
        for i, name in enumerate(names):
            _model(name, f"{key}[{i}]", source, features, hint)
        if len(set(names)) != len(names):
            raise ParamsError(f"{source}: {key} = {list(names)} lists a model twice")


def _choice(value: str, allowed: list[str], key: str, source: str) -> None:
    """Raise unless ``value`` is one of ``allowed``, naming the closest."""
    if value not in allowed:
        raise ParamsError(
            f"{source}: {key} = {value!r} is not allowed{closest(value, allowed)}; "
            f"allowed: {allowed}"
        )


def _model(
    name: str, where: str, source: str, features: bool | None = None, hint: str = ""
) -> type:
    """The registered recommender ``name`` (listed at ``where``); with ``features``, it must
    (not) read item features, else the error ends with ``hint``."""
    known = list_recommenders()
    if name not in known:
        raise ParamsError(
            f"{source}: {where}: {name!r} is not a registered recommender"
            f"{closest(name, known)}; known: {known}"
        )
    cls = get_recommender(name)
    if features is not None and cls.uses_features != features:
        what = "reads item features" if cls.uses_features else "is ID-only"
        raise ParamsError(f"{source}: {where}: {name!r} {what}: {hint}")
    return cls


def _section(
    mapping: Any, spec: Section, name: str, source: str, skip: tuple[str, ...] = ()
) -> dict[str, Any]:
    """One section (keys in ``skip`` left to the caller) checked, with each encoder's
    overrides merged over it if it has them; returned as written, floats made floats."""
    if mapping is not None and not isinstance(mapping, dict):
        raise ParamsError(f"{source}: {name} should be a mapping, got {mapping!r}")
    mapping = dict(mapping or {})
    own = {k: mapping.pop(k) for k in list(mapping) if spec.per_encoder and k in list_encoders()}
    kept = {k: mapping.pop(k) for k in skip if k in mapping}
    values = check_section(spec.cls, mapping, name, source, spec.fixed)
    if spec.cls is not TrainConfig:  # built by the caller with the seed and cut-offs
        construct(spec.cls, values, name, source)
    out = _as_written(mapping, values)
    for encoder, overrides in own.items():
        where = f"{name}.{encoder}"
        extra = check_section(spec.cls, overrides, where, source, spec.fixed, partial=True)
        construct(spec.cls, {**values, **extra}, where, source)
        out[encoder] = _as_written(overrides or {}, extra)
    return {**out, **kept}


def _hyperparameters(
    mapping: Any, model: str, where: str, source: str, under: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``<where>.<model>``: the model's hyperparameters checked against its own config (merged
    over ``under`` when it overrides them) and its ``train`` overrides; both as written."""
    if mapping is not None and not isinstance(mapping, dict):
        raise ParamsError(f"{source}: {where}.{model} should be a mapping, got {mapping!r}")
    mapping = dict(mapping or {})
    train = mapping.pop("train", None)
    config = get_recommender(model).config_class
    values = check_section(config, mapping, f"{where}.{model}", source, partial=True)
    construct(config, {**(under or {}), **values}, f"{where}.{model}", source)
    train_values = check_section(
        TrainConfig, train, f"{where}.{model}.train", source, TRAIN_FIXED, partial=True
    )
    return _as_written(mapping, values), _as_written(train or {}, train_values)


def _recommenders(mapping: Any, source: str) -> dict[str, tuple[dict, dict]]:
    """``recommenders``: model -> (hyperparameters, train overrides), each checked."""
    if mapping is not None and not isinstance(mapping, dict):
        raise ParamsError(f"{source}: recommenders should be a mapping of models, got {mapping!r}")
    out = {}
    for model, settings in (mapping or {}).items():
        _model(model, "recommenders", source)
        out[model] = _hyperparameters(settings, model, "recommenders", source)
    return out


def _e2e(
    mapping: Any,
    out: dict[str, Any],
    recommenders: dict[str, tuple[dict, dict]],
    train_cfg: dict[str, Any],
    source: str,
) -> dict[str, Any]:
    """``e2e``: its own keys and per-encoder overrides, ``e2e.train`` and
    ``e2e.recommenders.<model>`` (feature-reading models), each checked merged over what it
    overrides as stages.e2e merges them: train < recommenders.<m>.train < e2e.train <
    e2e.recommenders.<m>.train."""
    section = _section(mapping, sections()["e2e"], "e2e", source, skip=E2E_OVERRIDES)
    train = section.get("train")
    values = check_section(TrainConfig, train, "e2e.train", source, TRAIN_FIXED, partial=True)
    own = section.get("recommenders")
    if own is not None and not isinstance(own, dict):
        raise ParamsError(f"{source}: e2e.recommenders should be a mapping of models, got {own!r}")
    checked = {}
    for model, settings in (own or {}).items():
        hint = "only models that read item features train end to end"
        _model(model, "e2e.recommenders", source, True, hint)
        shared = recommenders.get(model, ({}, {}))[0]
        checked[model] = _hyperparameters(settings, model, "e2e.recommenders", source, shared)
    construct(TrainConfig, {**out["train"], **values}, "e2e.train", source, **train_cfg)
    for model in sorted(set(out["models"]) | set(checked)):
        own_train = checked.get(model, ({}, {}))[1]
        where = f"e2e.recommenders.{model}.train" if own_train else (
            f"e2e.train (over recommenders.{model}.train)"
        )  # fmt: skip
        merged = {**out["train"], **recommenders.get(model, ({}, {}))[1], **values, **own_train}
        construct(TrainConfig, merged, where, source, **train_cfg)
    if train is not None:
        section["train"] = _as_written(train, values)
    if own is not None:
        section["recommenders"] = {m: _joined(h, t) for m, (h, t) in checked.items()}
    return section


def _joined(hyperparameters: dict[str, Any], train: dict[str, Any]) -> dict[str, Any]:
    """A model's mapping again: its hyperparameters and, if any, its ``train`` overrides."""
    return {**hyperparameters, **({"train": train} if train else {})}


def _as_written(written: Mapping[str, Any], checked: Mapping[str, Any]) -> dict[str, Any]:
    """``written`` with the strings that were read as numbers replaced by those numbers."""
    return {k: _number(v, checked[k]) for k, v in written.items()}


def _number(written: Any, checked: Any) -> Any:
    """``written``, unless it is a string that ``checked`` read as a float (lists element-wise)."""
    if isinstance(written, str) and isinstance(checked, float):
        return checked
    if isinstance(written, list) and isinstance(checked, (list, tuple)):
        return [_number(w, c) for w, c in zip(written, checked, strict=True)]
    return written
