"""preprocess stage: a dataset's raw files -> interactions.parquet, items.parquet,
image_features.parquet, prepared_features.parquet, stats.json."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.data.datasets import dataset_spec
from pipeline.data.preprocess import PreprocessConfig
from pipeline.data.sources import get_source
from stages.params import build, require

log = logging.getLogger(__name__)


def run(params: dict[str, Any], raw: Path, out: Path) -> dict:
    """Filter, re-index and split the raw data of ``params['dataset']`` into ``out`` (a
    prepared source keeps its own split and features)."""
    name = require(params, "dataset")
    spec = dataset_spec(name, params.get("datasets"))
    source = get_source(spec.source)
    source.check(name, spec)
    cfg = build(
        PreprocessConfig, params.get("preprocess"), "preprocess", seed=require(params, "seed")
    )
    stats = source.preprocess(name, spec, raw, out, cfg)
    log.info("preprocess %s (%s): %s", name, spec.source, stats)
    return stats
