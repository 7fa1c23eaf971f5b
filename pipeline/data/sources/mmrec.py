"""MMRec's prepared folders (enoche/MMRec ``data/<name>/``): a fixed split and item features.

``<name>.inter``: tab-separated, header ``userID itemID rating timestamp x_label`` (x_label 0
train, 1 valid, 2 test; ids 0-based); ``image_feat.npy`` [items, 4096] and ``text_feat.npy``
[items, 384], row = itemID; optional ``i_id_mapping.csv`` (tab-separated ``asin itemID``).
The split is kept exactly, the ids too when dense. With ``meta`` (an Amazon 2014 metadata
file in the same place), the mapped items get their titles, texts and images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from pipeline.data.datasets import DatasetSpec
from pipeline.data.download import DownloadConfig
from pipeline.data.preprocess import PreprocessConfig
from pipeline.data.sources import Source, register_source
from pipeline.data.sources._prepared import (
    IMAGE_FEAT,
    TEXT_FEAT,
    MetaFiles,
    download_prepared,
    require,
    write_prepared,
)

ITEM_MAPPING = "i_id_mapping.csv"
LABELS = {0: "train", 1: "valid", 2: "test"}  # MMRec's x_label values


def read_inter(path: Path) -> pl.DataFrame:
    """``<name>.inter`` as user, item, rating, timestamp, split; bad labels raise naming them."""
    require(path, "MMRec's interactions (userID itemID rating timestamp x_label, tab-separated)")
    try:
        frame = pl.read_csv(path, separator="\t", infer_schema_length=10_000)
    except (pl.exceptions.PolarsError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not a tab-separated table with a header ({exc})") from None
    missing = [c for c in ("userID", "itemID", "x_label") if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{path}: no column(s) {missing} in its header {frame.columns}; MMRec's .inter has "
            "userID itemID rating timestamp x_label, tab-separated"
        )
    for column in ("userID", "itemID", "x_label"):
        if not frame[column].dtype.is_integer() or frame[column].null_count():
            raise ValueError(f"{path}: column {column} holds non-integer or empty values")
    bad = sorted(set(frame["x_label"].unique().to_list()) - set(LABELS))
    if bad:
        raise ValueError(
            f"{path}: x_label has values {bad[:5]}; allowed: 0 (train), 1 (valid), 2 (test)"
        )
    if frame["userID"].min() < 0 or frame["itemID"].min() < 0:
        raise ValueError(f"{path}: negative userID or itemID; MMRec's ids run from 0")
    labels = pl.Series(list(LABELS)), pl.Series([LABELS[k] for k in LABELS])
    return frame.select(
        pl.col("userID").cast(pl.Int64).alias("user"),
        pl.col("itemID").cast(pl.Int64).alias("item"),
        (pl.col("rating") if "rating" in frame.columns else pl.lit(1.0)).cast(pl.Float32)
        .fill_null(1.0).alias("rating"),
        (pl.col("timestamp") if "timestamp" in frame.columns else pl.lit(0)).cast(pl.Int64)
        .fill_null(0).alias("timestamp"),
        pl.col("x_label").replace_strict(*labels, return_dtype=pl.String).alias("split"),
    )  # fmt: skip


def read_item_mapping(path: Path) -> dict[int, str] | None:
    """``i_id_mapping.csv`` as itemID -> ASIN; None when the folder has none."""
    if not path.is_file():
        return None
    frame = pl.read_csv(path, separator="\t", infer_schema_length=10_000)
    if not {"asin", "itemID"} <= set(frame.columns):
        raise ValueError(f"{path}: header {frame.columns}; expected asin and itemID, tab-separated")
    asins = frame["asin"].cast(pl.String).to_list()
    return dict(zip(frame["itemID"].to_list(), asins, strict=True))


@register_source("mmrec")
class MMRec(Source):
    """An MMRec data folder (``category`` = the name of its ``<name>.inter``, e.g. baby)."""

    prepared = True
    needs_category = True

    def files(self, spec: DatasetSpec) -> list[tuple[str, bool]]:
        """The folder's files this source reads, each with whether it is required."""
        inter = f"{spec.category}.inter"
        return [(inter, True), (IMAGE_FEAT, True), (TEXT_FEAT, True), (ITEM_MAPPING, False)]

    def download(
        self, dataset: str, spec: DatasetSpec, out_dir: Path, cfg: DownloadConfig, demo: Any
    ) -> dict:
        """Copy (mirror) or fetch (url) the folder's files (and any ``meta``) into ``out_dir``."""
        mapping = (ITEM_MAPPING, read_item_mapping)
        base = self.base_url(spec)
        return download_prepared(dataset, spec, base, self.files(spec), mapping, out_dir, cfg)

    def preprocess(
        self, dataset: str, spec: DatasetSpec, raw_dir: Path, out_dir: Path, cfg: PreprocessConfig
    ) -> dict:
        """Keep MMRec's split (no k-core, no re-split) and its features."""
        inter = raw_dir / f"{spec.category}.inter"
        frame = read_inter(inter)
        asins = read_item_mapping(raw_dir / ITEM_MAPPING)
        meta = None
        if spec.meta:
            info = MetaFiles(dataset, dataset, False, ITEM_MAPPING, spec.meta, read_item_mapping)
            meta = (raw_dir / spec.meta, info)
        return write_prepared(frame, asins, raw_dir, out_dir, self.name, str(inter), meta, cfg)
