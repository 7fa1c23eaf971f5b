"""Raw Amazon 2014 files -> the processed contract, following MMRec's preprocessing protocol.

Steps (MMRec: ``preprocessing/0rating2inter.ipynb``, ``1splitting.ipynb``,
``3feat-encoder.ipynb``): drop invalid and duplicate rows, repeat k-core filtering on users
and items until stable, re-index from 0, split each user's shuffled interactions 8:1:1
(fewer than 10: all but two to train, one valid, one test), build item text, verify images,
and keep Amazon's published image features of the items when the raw folder has the file.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
from tqdm import tqdm

from pipeline.core.atomic import write_json
from pipeline.data.amazon import LineStats
from pipeline.data.cnn_features import IMAGE_FEATURES_FILE, published_features_table
from pipeline.data.datasets import IMAGES_DIR, DatasetInfo
from pipeline.data.images import ImageStatus, load_images
from pipeline.data.itemtext import item_text, item_title
from pipeline.data.prepared import PREPARED_FEATURES_FILE, no_prepared_features
from pipeline.data.schemas import INTERACTIONS, ITEMS, SPLITS, validate, write_table

log = logging.getLogger(__name__)

INTERACTIONS_FILE = "interactions.parquet"
ITEMS_FILE = "items.parquet"
STATS_FILE = "stats.json"


@dataclass(frozen=True)
class PreprocessConfig:
    """Settings of the preprocess stage."""

    core: int = 5  # k-core on users and items, repeated until stable (>= 3: one per split)
    seed: int = 2022  # seeds the per-user shuffle of the split
    image_size: int = 0  # 0 keeps original images; else resize + centre-crop to this square
    jpeg_quality: int = 90  # for re-encoded images and the placeholder
    workers: int = 8  # threads decoding images

    def __post_init__(self) -> None:
        if self.core < 3:
            raise ValueError(
                f"core = {self.core} is too small: each user needs at least 3 interactions "
                "(one train, one valid, one test); use core >= 3"
            )
        if self.image_size < 0:
            raise ValueError(f"image_size = {self.image_size}; use 0 (keep) or a positive side")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality = {self.jpeg_quality}; allowed 1..100")
        if self.workers < 1:
            raise ValueError(f"workers = {self.workers}; use at least 1")


def _number(value: Any) -> float | None:
    """A finite number from a JSON field, or None (missing, NaN, bool, not numeric)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _warn_malformed(path: Path, stats: LineStats) -> None:
    if stats.malformed:
        log.warning(
            "%s: skipped %d malformed of %d lines, e.g. %s",
            path,
            stats.malformed,
            stats.read,
            "; ".join(stats.examples),
        )


def read_reviews(path: Path, info: DatasetInfo) -> tuple[pl.DataFrame, LineStats, int]:
    """Reviews as a frame (user, item, rating, timestamp, row), their line stats, invalid rows.

    A row whose rating or time is missing or not a finite number is dropped and counted.
    """
    if not path.exists():
        raise FileNotFoundError(f"reviews file {path} does not exist (has download run?)")
    stats = LineStats()
    users, items, ratings, times = [], [], [], []
    invalid = 0
    for rec in tqdm(info.reviews(path, stats), desc="reviews", unit=" lines", disable=None):
        rating, ts = _number(rec.get("overall")), _number(rec.get("unixReviewTime"))
        if rating is None or ts is None:
            invalid += 1
            continue
        users.append(str(rec["reviewerID"]))
        items.append(str(rec["asin"]))
        ratings.append(rating)
        times.append(int(ts))
    _warn_malformed(path, stats)
    if invalid:
        log.warning("%s: dropped %d rows with a missing or invalid rating/time", path, invalid)
    df = pl.DataFrame(
        {"user": users, "item": items, "rating": ratings, "timestamp": times},
        schema={"user": pl.String, "item": pl.String, "rating": pl.Float32, "timestamp": pl.Int64},
    ).with_row_index("row")
    return df, stats, invalid


def drop_duplicates(df: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """Keep one row per (user, item): the earliest review (file order breaks ties)."""
    out = df.sort("user", "item", "timestamp", "row").unique(
        subset=["user", "item"], keep="first", maintain_order=True
    )
    return out, df.height - out.height


def kcore_filter(df: pl.DataFrame, core: int) -> tuple[pl.DataFrame, int]:
    """Drop users and items with fewer than ``core`` rows, repeatedly, until none is left.

    As MMRec does, each round drops the offending users and items found in the same pass.
    Returns the filtered frame and the number of rounds that removed something.
    """
    rounds = 0
    while True:
        kept = df.filter((pl.len().over("user") >= core) & (pl.len().over("item") >= core))
        if kept.height == df.height:
            return df, rounds
        df, rounds = kept, rounds + 1


def reindex(df: pl.DataFrame) -> tuple[pl.DataFrame, list[str]]:
    """Map users and items to int32 ids from 0 in sorted order of their original ids.

    Returns the frame with ``user_id``/``item_id`` and the asin of each item id.
    """
    df = df.with_columns(
        (pl.col("user").rank("dense") - 1).cast(pl.Int32).alias("user_id"),
        (pl.col("item").rank("dense") - 1).cast(pl.Int32).alias("item_id"),
    )
    return df, df["item"].unique().sort().to_list()


def split_labels(user_ids: np.ndarray, seed: int) -> np.ndarray:
    """Label each row train/valid/test per user after a seeded shuffle, as MMRec does.

    ``user_ids`` (n,) must come in a deterministic order. A user with n < 10 rows gets n - 2
    train, 1 valid, 1 test; otherwise int(0.2 n) are held out, half (rounded down) valid and
    the rest test.
    """
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(user_ids))
    order = perm[np.argsort(user_ids[perm], kind="stable")]  # grouped by user, shuffled within
    counts = np.bincount(user_ids)
    starts = np.cumsum(counts) - counts
    grouped = user_ids[order]
    n = counts[grouped]
    pos = np.arange(len(order)) - starts[grouped]
    held = np.where(n < 10, 2, (n * 0.2).astype(np.int64))
    n_valid = np.where(n < 10, 1, held // 2)
    n_train = n - held
    code = np.where(pos < n_train, 0, np.where(pos < n_train + n_valid, 1, 2))
    labels = np.empty(len(order), dtype=f"<U{max(map(len, SPLITS))}")
    labels[order] = np.asarray(SPLITS)[code]
    return labels


def read_item_meta(
    path: Path, asins: set[str], info: DatasetInfo
) -> tuple[dict[str, dict], LineStats]:
    """Metadata of the wanted items (first line wins), streamed from the metadata file."""
    if not path.exists():
        raise FileNotFoundError(f"metadata file {path} does not exist (has download run?)")
    stats = LineStats()
    meta: dict[str, dict] = {}
    for rec in tqdm(info.meta(path, stats), desc="metadata", unit=" lines", disable=None):
        asin = str(rec["asin"])
        if asin in asins and asin not in meta:
            meta[asin] = rec
    _warn_malformed(path, stats)
    return meta, stats


def _image_path(raw_dir: Path, asin: str) -> Path | None:
    """Where the item's image should be; None for an asin that is not a plain file name."""
    if Path(asin).name != asin or asin.startswith("."):
        return None
    return raw_dir / IMAGES_DIR / f"{asin}.jpg"


def build_items(
    raw_dir: Path, asins: list[str], meta: dict[str, dict], cfg: PreprocessConfig
) -> tuple[pa.Table, dict[str, int]]:
    """The items table (one row per item id) and counts of missing metadata and images."""
    paths = [_image_path(raw_dir, a) for a in asins]
    images = load_images(paths, cfg.image_size, cfg.jpeg_quality, cfg.workers)
    ok = [status is ImageStatus.OK for _, status in images]
    table = pa.table(
        {
            "item_id": pa.array(range(len(asins)), pa.int32()),
            "asin": pa.array(asins, pa.string()),
            "title": pa.array([item_title(meta.get(a)) for a in asins], pa.string()),
            "text": pa.array([item_text(meta.get(a)) for a in asins], pa.string()),
            "image_path": pa.array(
                [str(p) if good else None for p, good in zip(paths, ok, strict=True)], pa.string()
            ),
            "image_bytes": pa.array([data for data, _ in images], pa.binary()),
            "has_image": pa.array(ok, pa.bool_()),
        }
    )
    counts = {
        "items_without_metadata": sum(a not in meta for a in asins),
        "missing_images": sum(s is ImageStatus.MISSING for _, s in images),
        "corrupt_images": sum(s is ImageStatus.CORRUPT for _, s in images),
    }
    return table, counts


def preprocess(raw_dir: Path, info: DatasetInfo, out_dir: Path, cfg: PreprocessConfig) -> dict:
    """Filter, re-index and split ``raw_dir``'s files into ``out_dir``; return the stats.

    Writes interactions.parquet, items.parquet, image_features.parquet (Amazon's published CNN
    vectors of the items that have one; no rows without the ``.b`` file),
    prepared_features.parquet (no rows: a raw source's features are extracted) and stats.json, each
    atomically and only after all of them have been built and validated, so a failure leaves
    earlier outputs untouched.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    df, review_lines, invalid = read_reviews(raw_dir / info.reviews_file, info)
    df, duplicates = drop_duplicates(df)
    before = {"users": df["user"].n_unique(), "items": df["item"].n_unique(), "rows": df.height}
    df, rounds = kcore_filter(df, cfg.core)
    if df.height == 0:
        raise ValueError(
            f"{info.name}: k-core filtering with core={cfg.core} left no interactions; "
            f"before filtering there were {before['users']} users, {before['items']} items and "
            f"{before['rows']} interactions. Lower preprocess.core or check the raw data."
        )
    df, asins = reindex(df)
    df = df.sort("user_id", "item_id")
    df = df.with_columns(pl.Series("split", split_labels(df["user_id"].to_numpy(), cfg.seed)))
    interactions = df.select("user_id", "item_id", "rating", "timestamp", "split").to_arrow()
    split_col = interactions.schema.get_field_index("split")  # polars writes large_string
    interactions = interactions.set_column(
        split_col, "split", interactions["split"].cast(pa.string())
    )
    interactions = validate(interactions, INTERACTIONS, "interactions")

    meta, meta_lines = read_item_meta(raw_dir / info.meta_file, set(asins), info)
    items, item_counts = build_items(raw_dir, asins, meta, cfg)
    items = validate(items, ITEMS, "items")
    image_features, feature_counts = published_features_table(
        asins, raw_dir / info.image_features_file
    )

    n_users, n_items = int(df["user_id"].max()) + 1, len(asins)
    stats = {
        "users": n_users,
        "items": n_items,
        "interactions": df.height,
        "density": df.height / (n_users * n_items),
        **{f"{s}_interactions": int((df["split"] == s).sum()) for s in SPLITS},
        "review_lines": review_lines.read,
        "malformed_review_lines": review_lines.malformed,
        "meta_lines": meta_lines.read,
        "malformed_meta_lines": meta_lines.malformed,
        "dropped_invalid_rows": invalid,
        "dropped_duplicates": duplicates,
        "kcore_input_interactions": before["rows"],
        "kcore_dropped_interactions": before["rows"] - df.height,
        "kcore_rounds": rounds,
        **item_counts,
        **feature_counts,
        "core": cfg.core,
        "seed": cfg.seed,
        "image_size": cfg.image_size,
    }
    for key in ("items_without_metadata", "missing_images", "corrupt_images"):
        if stats[key]:
            log.warning("%s: %d of %d items: %s", info.name, stats[key], n_items, key)

    write_table(interactions, out_dir / INTERACTIONS_FILE, INTERACTIONS, "interactions")
    write_table(items, out_dir / ITEMS_FILE, ITEMS, "items")
    write_table(
        image_features, out_dir / IMAGE_FEATURES_FILE, image_features.schema, "image_features"
    )
    prepared = no_prepared_features()
    write_table(prepared, out_dir / PREPARED_FEATURES_FILE, prepared.schema, "prepared_features")
    write_json(out_dir / STATS_FILE, stats)
    log.info(
        "%s: %d users, %d items, %d interactions (density %.5f)",
        info.name,
        n_users,
        n_items,
        df.height,
        stats["density"],
    )
    return stats
