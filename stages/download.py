"""download stage: generate the demo shop, or fetch an Amazon 2014 category, into data/raw."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.datasets import DATASETS, get_dataset
from stages.params import build, require

log = logging.getLogger(__name__)


def run(params: dict[str, Any], out: Path) -> dict:
    """Write the dataset's raw files (reviews, metadata, images, manifest) to ``out``."""
    info = get_dataset(require(params, "dataset", DATASETS))
    if info.synthetic:
        from pipeline.demo.shop import DemoConfig, generate_shop

        summary = generate_shop(build(DemoConfig, params.get("demo"), "demo"), out, info.category)
    else:
        from pipeline.download import DownloadConfig, download_dataset

        cfg = build(DownloadConfig, params.get("download"), "download")
        summary = download_dataset(info, out, cfg)
    log.info("download %s -> %s: %s", info.name, out, summary)
    return summary
