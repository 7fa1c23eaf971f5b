"""extract stage: encode every item's image and text into the Parquet + FAISS feature store.

The feature set's name must match the weights it is made from (``cnn_st`` from the baseline's
weights, ``<lmm>-pretrained`` / ``<lmm>-finetuned`` from the LMM's), so a mislabelled set can
never reach the recommenders. The stage reads no encoder param: the weights card says it all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.features.extract import ExtractConfig, extract_feature_set
from stages.params import build


def run(
    params: dict[str, Any],
    feature_set: str,
    items: Path,
    weights: Path,
    out: Path,
    published: Path | None = None,
    prepared: Path | None = None,
) -> None:
    """Encode the items in ``items`` with the weights in ``weights``; write ``out`` (see
    ``extract_feature_set``)."""
    cfg = build(ExtractConfig, params.get("extract"), "extract")
    extract_feature_set(feature_set, items, weights, out, cfg, published, prepared)
