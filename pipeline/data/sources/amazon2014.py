"""Amazon Reviews 2014 (McAuley et al.): the 5-core reviews, metadata, CNN image features and
product images of a category, downloaded and preprocessed by MMRec's protocol."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline.data.datasets import DatasetInfo, DatasetSpec
from pipeline.data.download import DownloadConfig, download_dataset
from pipeline.data.preprocess import PreprocessConfig, preprocess
from pipeline.data.sources import Source, register_source


@register_source("amazon2014")
class Amazon2014(Source):
    """``reviews_<Category>_5.json.gz``, ``meta_<Category>.json.gz``,
    ``image_features_<Category>.b`` from the ``download.*_url`` bases (or a mirror folder)."""

    def check(self, dataset: str, spec: DatasetSpec) -> None:
        """Category needed; the base URLs are ``download.*_url``, not ``url``."""
        if not spec.category:
            raise ValueError(f"datasets.{dataset}.category is empty: amazon2014 needs one")
        if spec.meta:
            raise ValueError(f"datasets.{dataset}.meta: amazon2014 reads its own metadata file")
        if spec.url:
            raise ValueError(
                f"datasets.{dataset}.url: amazon2014 reads its three base URLs from "
                "download.reviews_url, download.meta_url and download.image_features_url"
            )

    def download(
        self, dataset: str, spec: DatasetSpec, out_dir: Path, cfg: DownloadConfig, demo: Any
    ) -> dict:
        """Fetch the category's files; with a mirror, every file (and image) from that folder."""
        info = DatasetInfo(dataset, spec.category, False)
        if not spec.mirror:
            return download_dataset(info, out_dir, cfg)
        base = self.base_url(spec)
        cfg = replace(cfg, reviews_url=base, meta_url=base, image_features_url=base)
        return download_dataset(info, out_dir, cfg, Path(spec.mirror).expanduser())

    def preprocess(
        self, dataset: str, spec: DatasetSpec, raw_dir: Path, out_dir: Path, cfg: PreprocessConfig
    ) -> dict:
        """MMRec's protocol over the downloaded files."""
        return preprocess(raw_dir, DatasetInfo(dataset, spec.category, False), out_dir, cfg)
