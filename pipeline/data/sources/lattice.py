"""LATTICE's prepared folders (CRIPAC-DIG/LATTICE ``data/<name>/``): a fixed split and features.

``5-core/train.json``, ``5-core/val.json``, ``5-core/test.json``: JSON objects user id -> list
of item ids (0-based); ``image_feat.npy`` and ``text_feat.npy``, row = item id; optional
``item2id.json`` (ASIN -> item id). No ratings or times: rating 1, timestamp 0. With ``meta``
(an Amazon 2014 metadata file in the same place), the mapped items get titles, texts, images.
"""

from __future__ import annotations

import json
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

SPLIT_FILES = {"train": "5-core/train.json", "valid": "5-core/val.json", "test": "5-core/test.json"}
ITEM_MAPPING = "item2id.json"


def read_split(path: Path, split: str) -> pl.DataFrame:
    """One split file as user, item, split rows; anything but {int: [int, ...]} raises."""
    require(path, f"LATTICE's {split} split (a JSON object: user id -> list of item ids)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object user id -> list of item ids")
    users, items = [], []
    for user, listed in data.items():
        ok = isinstance(listed, list) and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in listed
        )
        if not (str(user).isdigit() and ok):
            raise ValueError(
                f"{path}: user {user!r} -> {str(listed)[:60]}; need a user id >= 0 mapped to a "
                "list of item ids >= 0"
            )
        users += [int(user)] * len(listed)
        items += listed
    return pl.DataFrame(
        {"user": users, "item": items, "split": [split] * len(users)},
        schema={"user": pl.Int64, "item": pl.Int64, "split": pl.String},
    )


def read_item_mapping(path: Path) -> dict[int, str] | None:
    """``item2id.json`` as item id -> ASIN; None when the folder has none."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not all(isinstance(v, int) for v in data.values()):
        raise ValueError(f"{path}: expected a JSON object ASIN -> item id")
    return {item: str(asin) for asin, item in data.items()}


@register_source("lattice")
class Lattice(Source):
    """A LATTICE data folder."""

    prepared = True

    def files(self) -> list[tuple[str, bool]]:
        """The folder's files this source reads, each with whether it is required."""
        return [
            *((name, True) for name in SPLIT_FILES.values()),
            (IMAGE_FEAT, True),
            (TEXT_FEAT, True),
            (ITEM_MAPPING, False),
        ]

    def download(
        self, dataset: str, spec: DatasetSpec, out_dir: Path, cfg: DownloadConfig, demo: Any
    ) -> dict:
        """Copy (mirror) or fetch (url) the folder's files (and any ``meta``) into ``out_dir``."""
        mapping = (ITEM_MAPPING, read_item_mapping)
        base = self.base_url(spec)
        return download_prepared(dataset, spec, base, self.files(), mapping, out_dir, cfg)

    def preprocess(
        self, dataset: str, spec: DatasetSpec, raw_dir: Path, out_dir: Path, cfg: PreprocessConfig
    ) -> dict:
        """Keep LATTICE's split (no k-core, no re-split) and its features."""
        frame = pl.concat([read_split(raw_dir / f, s) for s, f in SPLIT_FILES.items()])
        frame = frame.with_columns(
            pl.lit(1.0, pl.Float32).alias("rating"), pl.lit(0, pl.Int64).alias("timestamp")
        )
        asins = read_item_mapping(raw_dir / ITEM_MAPPING)
        meta = None
        if spec.meta:
            info = MetaFiles(dataset, dataset, False, ITEM_MAPPING, spec.meta, read_item_mapping)
            meta = (raw_dir / spec.meta, info)
        where = str(raw_dir / "5-core")
        return write_prepared(frame, asins, raw_dir, out_dir, self.name, where, meta, cfg)
