"""Top-k recommendation from a trained recommender: one user described with titles, or every
user as a Parquet table.

Reads what the pipeline made: ``models/<dataset>/<feature_set>/<model>/seed-<seed>/model.pt``
(the best validation epoch's weights of the run with that training seed),
``data/processed/<dataset>/`` (interactions, item titles) and, for models that read item
features, ``features/<dataset>/<feature_set>/``. The ranking is the evaluator's
(``pipeline.training.evaluation.recommend``): every item scored, the user's train items
masked, ties broken by lower item id.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.core.atomic import atomic_path
from pipeline.core.distributed import resolve_device
from pipeline.data.interactions import InteractionData, load_interactions
from pipeline.data.schemas import ITEMS, check_item_rows, read_table, remedy, seed_folder
from pipeline.features.names import ID_ONLY, train_stage
from pipeline.recommenders import get_recommender
from pipeline.recommenders.base import Recommender
from pipeline.training.evaluation import recommend
from pipeline.training.trainer import MODEL_FILE, TrainConfig, load_item_features

log = logging.getLogger(__name__)

RECOMMENDATIONS = pa.schema(
    [
        pa.field("user_id", pa.int32(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),  # 1 = best
        pa.field("item_id", pa.int32(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),  # the model's raw score
    ]
)


def load_model(
    name: str,
    hyperparameters: Mapping[str, Any] | None,
    feature_set: str,
    data: InteractionData,
    model_file: Path,
    features_dir: Path,
    seed: int,
) -> Recommender:
    """Rebuild recommender ``name`` with its ``hyperparameters`` (``recommenders.<name>``) and
    load the trained weights of its run with training ``seed`` (eval mode)."""
    model_cls = get_recommender(name)
    if model_cls.uses_features and feature_set == ID_ONLY:
        raise ValueError(f"{name} reads item features: name a feature set, not {ID_ONLY!r}")
    if not model_cls.uses_features and feature_set != ID_ONLY:
        raise ValueError(f"{name} is ID-only: its runs live under feature set {ID_ONLY!r}")
    if not model_file.is_file():
        stage = train_stage(name, feature_set, seed)
        raise FileNotFoundError(f"{model_file} not found: train it first with `dvc repro {stage}`")
    features = None
    if model_cls.uses_features:
        features = load_item_features(features_dir, data.n_items)
    model = model_cls.build(data, features, hyperparameters)
    state = torch.load(model_file, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise RuntimeError(
            f"{model_file} does not fit recommenders.{name} in the params file ({first}); "
            f"re-train it with `dvc repro {train_stage(name, feature_set, seed)}`"
        ) from exc
    return model.eval()


def top_k_table(
    model: Recommender,
    data: InteractionData,
    users: np.ndarray,
    k: int,
    batch_size: int = 4096,
    device: torch.device | str = "cpu",
) -> pa.Table:
    """Top-``k`` of ``users`` with their scores, train items masked: ``RECOMMENDATIONS`` rows,
    k per user, ordered by user then rank."""
    users = np.asarray(users, dtype=np.int64)
    unseen = data.n_items - np.diff(data.train.indptr)[users]
    if not 1 <= k <= unseen.min(initial=data.n_items):
        worst = int(users[np.argmin(unseen)]) if len(users) else None
        raise ValueError(
            f"k = {k}; use 1..{unseen.min(initial=data.n_items)} "
            f"(user {worst} has that many items outside their train set)"
        )
    model.to(device)
    items = np.empty((len(users), k), dtype=np.int64)
    scores = np.empty((len(users), k), dtype=np.float32)
    for start in range(0, len(users), batch_size):
        batch = users[start : start + batch_size]
        with torch.no_grad():
            raw = model.score(torch.from_numpy(batch).to(device)).float()
        ranked = recommend(lambda _, s=raw: s, data, batch, k, len(batch))
        items[start : start + len(batch)] = ranked
        index = torch.from_numpy(ranked).to(raw.device)
        scores[start : start + len(batch)] = raw.gather(1, index).cpu().numpy()
    return pa.table(
        {
            "user_id": np.repeat(users, k).astype(np.int32),
            "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), len(users)),
            "item_id": items.ravel().astype(np.int32),
            "score": scores.ravel(),
        },
        schema=RECOMMENDATIONS,
    )


def read_titles(items_file: Path, data: InteractionData) -> dict[int, str]:
    """Item titles from ``items_file``, whose items must be exactly the interactions' (an
    item id beyond the items table is a damaged or mismatched file, even for ID-only models)."""
    table = read_table(items_file, ITEMS, "items", columns=["item_id", "title"])
    ids = table.column("item_id").to_numpy()
    check_item_rows(ids, data.n_items, f"items {items_file}", remedy("items"))
    return dict(zip(ids.tolist(), table.column("title").to_pylist(), strict=True))


def describe_user(
    data: InteractionData, user: int, recs: pa.Table, titles: dict[int, str], label: str
) -> str:
    """The user's train history and their top-k as text; held-out hits are marked."""
    history = data.items_of("train", user)
    held_out = {int(i): split for split in ("valid", "test") for i in data.items_of(split, user)}
    lines = [f"user {user}: {len(history)} train items"]
    lines += [f"  {i:>7}  {titles.get(int(i), '?')}" for i in history]
    lines.append(f"top-{recs.num_rows} by {label} (train items masked):")
    for rank, item, score in zip(
        *(recs.column(c).to_pylist() for c in ("rank", "item_id", "score")), strict=True
    ):
        mark = f"  [{held_out[item]}]" if item in held_out else ""
        lines.append(f"  {rank:>3}. {item:>7}  {score:9.4f}  {titles.get(item, '?')}{mark}")
    return "\n".join(lines)


def recommend_from_files(
    dataset: str,
    feature_set: str,
    model: str,
    hyperparameters: Mapping[str, Any] | None,
    cfg: TrainConfig,
    user: int | None,
    k: int,
    all_users: bool,
    out: Path | None,
    processed: Path = Path("data/processed"),
    features: Path = Path("features"),
    models: Path = Path("models"),
) -> tuple[pa.Table, str | None]:
    """Recommend ``k`` items to ``user`` or, with ``all_users``, to every user (written to
    ``out`` as Parquet, atomically), from the run of ``model`` with training seed
    ``cfg.seed`` (its scoring batch and device from ``cfg`` too). Returns the recommendation
    rows and, for one user, their description with titles."""
    if all_users == (user is not None):
        raise ValueError("give either --user U or --all (with --out), not both or neither")
    if all_users and out is None:
        raise ValueError("--all writes a Parquet file: give --out, e.g. --out recs.parquet")
    data = load_interactions(processed / dataset / "interactions.parquet")
    titles = read_titles(processed / dataset / "items.parquet", data)
    if user is not None and not 0 <= user < data.n_users:
        raise ValueError(f"user {user} is unknown: {dataset} has user ids 0..{data.n_users - 1}")
    recommender = load_model(
        model,
        hyperparameters,
        feature_set,
        data,
        models / dataset / feature_set / model / seed_folder(cfg.seed) / MODEL_FILE,
        features / dataset / feature_set,
        cfg.seed,
    )
    users = np.arange(data.n_users) if all_users else np.array([user])
    recs = top_k_table(recommender, data, users, k, cfg.eval_batch_size, resolve_device(cfg.device))
    if out is not None:
        with atomic_path(out) as tmp:
            pq.write_table(recs, tmp)
        log.info("wrote top-%d of %d users to %s", k, len(users), out)
    if all_users:
        return recs, None
    label = model if feature_set == ID_ONLY else f"{model} on {feature_set}"
    return recs, describe_user(data, int(user), recs, titles, label)
