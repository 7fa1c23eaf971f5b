"""recommend: top-k items of a trained recommender, for one user (printed) or every user
(see ``pipeline.training.recommend``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import typer

from pipeline.training.recommend import recommend_from_files
from pipeline.training.trainer import TrainConfig
from stages.params import ParamsError, model_settings, require, train_config, training_seeds


def run(
    params: dict[str, Any],
    dataset: str,
    feature_set: str,
    model: str,
    user: int | None,
    k: int,
    all_users: bool,
    out: Path | None,
    seed: int | None = None,
    processed: Path = Path("data/processed"),
    features: Path = Path("features"),
    models: Path = Path("models"),
) -> pa.Table:
    """Recommend ``k`` items to ``user`` (printed with titles) or, with ``all_users``, to every
    user (written to ``out`` as Parquet, atomically), from the run with training ``seed``
    (default: the first of ``seeds``). Returns the recommendation rows."""
    seeds = training_seeds(params)
    if seed is not None and seed not in seeds:
        raise ParamsError(
            f"--seed {seed}: the pipeline trains seeds {seeds}; add it to `seeds` and run "
            "`dvc repro` to train that run"
        )
    cfg = train_config(TrainConfig, params, seed=seed)
    hyperparameters, _ = model_settings(require(params, "recommenders"), model)
    recs, text = recommend_from_files(
        dataset, feature_set, model, hyperparameters, cfg, user, k, all_users, out,
        processed, features, models,
    )  # fmt: skip
    if text is not None:
        typer.echo(text)
    return recs
