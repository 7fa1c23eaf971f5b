"""extract stage: encode every item's image and text into the Parquet + FAISS feature store."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.encoders import list_encoders, load_encoder
from pipeline.features import (
    ExtractConfig,
    extract_features,
    feature_metadata,
    write_feature_store,
)
from pipeline.schemas import ITEMS, read_table
from stages.params import ParamsError, build, require

log = logging.getLogger(__name__)


def run(params: dict[str, Any], feature_set: str, items: Path, weights: Path, out: Path) -> None:
    """Encode the items in ``items`` with the weights in ``weights``; write ``out``."""
    encoder_name = require(params, "encoder", list_encoders())
    allowed = [f"{encoder_name}-pretrained"]
    if feature_set not in allowed:
        raise ParamsError(f"feature set {feature_set!r} is not known; allowed: {allowed}")
    cfg = build(ExtractConfig, params.get("extract"), "extract")
    encoder = load_encoder(weights)
    table = read_table(items, ITEMS, "items")
    image, text = extract_features(encoder, table, cfg)
    metadata = {**feature_metadata(encoder, table, cfg), "feature_set": feature_set}
    write_feature_store(out, table.column("item_id").to_numpy(), image, text, metadata)
    log.info("extract %s: %d items -> %s", feature_set, table.num_rows, out)
