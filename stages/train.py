"""train stage: one recommender on one feature set (or ID-only), evaluated on the test split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.training.trainer import TrainConfig, train_from_files
from stages.params import model_settings, require, train_config


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
    model_params, own_train = model_settings(require(params, "recommenders"), model)
    cfg = train_config(TrainConfig, params, own_train, seed=seed)
    return train_from_files(
        model, feature_set, interactions, features, model_params, cfg, out, checkpoint
    )
