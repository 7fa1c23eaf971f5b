"""download stage: generate the demo shop, or fetch a dataset's files from its source, into
data/raw."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.data.datasets import dataset_spec
from pipeline.data.download import DownloadConfig
from pipeline.data.sources import get_source
from stages.params import build, require

log = logging.getLogger(__name__)


def run(params: dict[str, Any], out: Path) -> dict:
    """Write the dataset's raw files (reviews, metadata, images or a prepared folder's files,
    and a manifest) to ``out``, from the source its ``datasets.<name>`` entry names."""
    name = require(params, "dataset")
    spec = dataset_spec(name, params.get("datasets"))
    source = get_source(spec.source)
    source.check(name, spec)
    cfg = build(DownloadConfig, params.get("download"), "download")
    demo = None
    if spec.source == "demo":
        from pipeline.data.demo.shop import DemoConfig

        demo = build(DemoConfig, params.get("demo"), "demo")
    summary = source.download(name, spec, out, cfg, demo)
    log.info("download %s (%s) -> %s: %s", name, spec.source, out, summary)
    return summary
