"""preprocess stage: raw Amazon-format files -> interactions.parquet, items.parquet, stats.json."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.datasets import DATASETS, get_dataset
from pipeline.preprocess import PreprocessConfig, preprocess
from stages.params import build, require

log = logging.getLogger(__name__)


def run(params: dict[str, Any], raw: Path, out: Path) -> dict:
    """Filter, re-index and split the raw data of ``params['dataset']`` into ``out``."""
    info = get_dataset(require(params, "dataset", DATASETS))
    cfg = build(
        PreprocessConfig, params.get("preprocess"), "preprocess", seed=require(params, "seed")
    )
    stats = preprocess(raw, info, out, cfg)
    log.info("preprocess %s: %s", info.name, stats)
    return stats
