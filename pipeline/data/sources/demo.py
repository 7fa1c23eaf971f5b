"""The offline demo shop: generated locally in the Amazon 2014 formats, then preprocessed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.data.datasets import DatasetInfo, DatasetSpec
from pipeline.data.download import DownloadConfig
from pipeline.data.preprocess import PreprocessConfig, preprocess
from pipeline.data.sources import Source, register_source


@register_source("demo")
class Demo(Source):
    """``dataset: demo``: nothing is fetched; the download stage generates the shop."""

    def check(self, dataset: str, spec: DatasetSpec) -> None:
        """The demo names its files by ``category`` and has no location."""
        if not spec.category:
            raise ValueError(f"datasets.{dataset}.category is empty: the demo's files need one")
        if spec.url or spec.mirror or spec.meta:
            raise ValueError(
                f"datasets.{dataset}: the demo is generated; set no url, mirror or meta"
            )

    def download(
        self, dataset: str, spec: DatasetSpec, out_dir: Path, cfg: DownloadConfig, demo: Any
    ) -> dict:
        """Generate the demo shop (reviews, metadata, images) into ``out_dir``."""
        from pipeline.data.demo.shop import generate_shop

        return generate_shop(demo, out_dir, spec.category)

    def preprocess(
        self, dataset: str, spec: DatasetSpec, raw_dir: Path, out_dir: Path, cfg: PreprocessConfig
    ) -> dict:
        """MMRec's protocol over the generated files."""
        return preprocess(raw_dir, DatasetInfo(dataset, spec.category, True), out_dir, cfg)
