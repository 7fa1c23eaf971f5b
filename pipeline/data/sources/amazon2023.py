"""Amazon Reviews 2023 (McAuley lab): a category's reviews and item metadata, items keyed by
``parent_asin``; downloaded and preprocessed by MMRec's protocol like the 2014 release.

Files: ``review_categories/<Category>.jsonl`` (user_id, parent_asin, rating, timestamp in ms)
and ``meta_categories/<Category>.jsonl`` named ``meta_<Category>.jsonl`` (title, features,
description, store, categories, images: a list of {thumb, large, hi_res, variant}). A mirror
folder holds the two files side by side. The release publishes no CNN image features.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipeline.data.amazon import LineStats, json_lines
from pipeline.data.datasets import DatasetInfo, DatasetSpec
from pipeline.data.download import DownloadConfig, download_dataset
from pipeline.data.preprocess import PreprocessConfig, preprocess
from pipeline.data.sources import Source, register_source

RELEASE = "https://huggingface.co/datasets/McAuley-Lab/Amazon-Reviews-2023/resolve/main/raw/"
REVIEWS_DIR, META_DIR = "review_categories/", "meta_categories/"


def _image_url(images: Any) -> str | None:
    """The MAIN image's (else the first image's) ``large`` URL, else its ``hi_res``."""
    if not isinstance(images, list):
        return None
    found = [i for i in images if isinstance(i, dict)]
    main = [i for i in found if i.get("variant") == "MAIN"] or found
    for image in main[:1]:
        for key in ("large", "hi_res", "thumb"):
            if isinstance(image.get(key), str) and image[key].strip():
                return image[key].strip()
    return None


@dataclass(frozen=True)
class Amazon2023Files(DatasetInfo):
    """A 2023 category's file names and readers, giving records in the 2014 shape."""

    @property
    def reviews_file(self) -> str:
        return f"{self.category}.jsonl"

    @property
    def meta_file(self) -> str:
        return f"meta_{self.category}.jsonl"

    @property
    def publishes_image_features(self) -> bool:
        return False

    def reviews(self, path: Path, stats: LineStats) -> Iterator[dict]:
        """Reviews with a user_id and parent_asin; the timestamp (ms) becomes seconds."""
        for lineno, rec in json_lines(path, stats):
            if not rec.get("user_id") or not rec.get("parent_asin"):
                stats.skip(lineno, "no user_id/parent_asin")
                continue
            ts = rec.get("timestamp")
            ok = isinstance(ts, (int, float)) and not isinstance(ts, bool) and math.isfinite(ts)
            yield {
                "reviewerID": str(rec["user_id"]),
                "asin": str(rec["parent_asin"]),
                "overall": rec.get("rating"),
                "unixReviewTime": int(ts) // 1000 if ok else None,
            }

    def meta(self, path: Path, stats: LineStats) -> Iterator[dict]:
        """Items by parent_asin: store as the brand, features + description as the description,
        the main image's URL as imUrl."""
        for lineno, rec in json_lines(path, stats):
            if not rec.get("parent_asin"):
                stats.skip(lineno, "no parent_asin")
                continue
            features, description = rec.get("features"), rec.get("description")
            yield {
                "asin": str(rec["parent_asin"]),
                "title": rec.get("title"),
                "brand": rec.get("store"),
                "categories": [rec.get("categories") or []],
                "description": [
                    *(features if isinstance(features, list) else [features]),
                    *(description if isinstance(description, list) else [description]),
                ],
                "imUrl": _image_url(rec.get("images")),
            }


@register_source("amazon2023")
class Amazon2023(Source):
    """A category of Amazon Reviews 2023 (names as in that release, e.g. ``Baby_Products``)."""

    needs_category = True
    default_url = RELEASE

    def download(
        self, dataset: str, spec: DatasetSpec, out_dir: Path, cfg: DownloadConfig, demo: Any
    ) -> dict:
        """Fetch reviews, metadata and the main image of each reviewed item."""
        info = Amazon2023Files(dataset, spec.category, False)
        base = self.base_url(spec)
        if spec.mirror:
            cfg = replace(cfg, reviews_url=base, meta_url=base)
            return download_dataset(info, out_dir, cfg, Path(spec.mirror).expanduser())
        cfg = replace(cfg, reviews_url=base + REVIEWS_DIR, meta_url=base + META_DIR)
        return download_dataset(info, out_dir, cfg)

    def preprocess(
        self, dataset: str, spec: DatasetSpec, raw_dir: Path, out_dir: Path, cfg: PreprocessConfig
    ) -> dict:
        """MMRec's protocol, as for the 2014 release."""
        return preprocess(raw_dir, Amazon2023Files(dataset, spec.category, False), out_dir, cfg)
