"""train stage: one recommender on one feature set (or ID-only), evaluated on the test split."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.data.interactions import load_interactions
from pipeline.data.schemas import ID_ONLY
from pipeline.recommenders import get_recommender
from pipeline.recommenders.base import ItemFeatures
from pipeline.training.trainer import TrainConfig, train_recommender
from stages.params import ParamsError, build, model_settings, require

log = logging.getLogger(__name__)


def train_config(
    params: dict[str, Any], *overrides: dict[str, Any], seed: int | None = None
) -> TrainConfig:
    """TrainConfig from the `train` section with ``overrides`` over it in order (e.g. a model's
    ``recommenders.<model>.train``) and eval.topk; ``seed`` is the run's training seed
    (initialisation, sampling, dropout), by default the first of ``seeds``."""
    topk = tuple(require(params, "eval.topk"))
    train = {**(params.get("train") or {})}
    for mapping in overrides:
        train.update(mapping)
    seed = training_seeds(params)[0] if seed is None else seed
    return build(TrainConfig, train, "train", seed=seed, topk=topk)


def training_seeds(params: dict[str, Any]) -> list[int]:
    """The training seeds the train, train_id and e2e matrices run over (``seeds``, default
    ``[seed]``); the data split stays fixed by the global ``seed``."""
    seeds = params.get("seeds")
    return [require(params, "seed")] if seeds is None else list(seeds)


def run(
    params: dict[str, Any],
    model: str,
    feature_set: str,
    interactions: Path,
    features: Path | None,
    out: Path,
    checkpoint: Path | None = None,
    seed: int | None = None,
) -> dict:
    """Train ``model`` on ``interactions`` with the item features in ``features``; write ``out``.

    With ``checkpoint``, an interrupted run continues from its last evaluation; ``seed`` is
    the training seed (default: the first of ``seeds``).
    """
    model_cls = get_recommender(model)
    model_params, own_train = model_settings(require(params, "recommenders"), model)
    data = load_interactions(interactions)
    item_features = None
    if model_cls.uses_features:
        if feature_set == ID_ONLY or features is None:
            raise ParamsError(f"{model} reads item features: give --feature-set and --features")
        from pipeline.features.store import read_feature_store

        store = read_feature_store(features, data.n_items)
        item_features = ItemFeatures.from_arrays(
            store.item_ids, store.image, store.text, data.n_items
        )
    elif feature_set != ID_ONLY:
        raise ParamsError(f"{model} is ID-only: train it with --feature-set {ID_ONLY}")
    cfg = train_config(params, own_train, seed=seed)
    metrics = train_recommender(model, data, item_features, model_params, cfg, out, checkpoint)
    log.info("%s on %s: %s", model, feature_set, metrics)
    return metrics
