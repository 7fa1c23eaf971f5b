"""extract stage: encode every item's image and text into the Parquet + FAISS feature store.

The feature set's name must match the weights it is made from (``cnn_st`` from the baseline's
weights, ``<lmm>-pretrained`` / ``<lmm>-finetuned`` from the LMM's), so a mislabelled set can
never reach the recommenders. The stage reads no encoder param: the weights card says it all.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.distributed import world
from pipeline.data.cnn_features import published_image_features
from pipeline.data.prepared import PreparedFeatures, read_prepared, require_raw_items
from pipeline.data.schemas import ITEMS, check_item_rows, read_table, remedy
from pipeline.encoders import load_encoder, read_card
from pipeline.features.store import (
    ExtractConfig,
    extract_features,
    feature_metadata,
    finish,
    write_feature_store,
)
from stages.params import ParamsError, build

log = logging.getLogger(__name__)

BASELINE = "cnn_st"


def feature_set_of(card: dict) -> str:
    """The feature set a weights folder makes: cnn_st, <lmm>-pretrained or <lmm>-finetuned."""
    if card["encoder"] == BASELINE:
        return BASELINE
    stage = "finetuned" if "+finetuned:" in card["pretrained"] else "pretrained"
    return f"{card['encoder']}-{stage}"


def run(
    params: dict[str, Any],
    feature_set: str,
    items: Path,
    weights: Path,
    out: Path,
    published: Path | None = None,
    prepared: Path | None = None,
) -> None:
    """Encode the items in ``items`` with the weights in ``weights``; write ``out``. Under
    ``torchrun --nproc_per_node N`` each process encodes a shard and rank 0 writes.

    For ``cnn_st``, the image features are Amazon's published CNN vectors when ``published``
    (preprocess's image_features.parquet) has any, mean-filled for the items without one; and
    when ``prepared`` (preprocess's prepared_features.parquet) has rows, the set is a prepared
    source's own features, stored as given (nothing is encoded, ``weights`` is not read).
    """
    cfg = build(ExtractConfig, params.get("extract"), "extract")
    table = read_table(items, ITEMS, "items")
    item_ids = table.column("item_id").to_numpy()
    given_features = None if prepared is None else read_prepared(prepared)
    if given_features is not None and feature_set == BASELINE:
        _store_prepared(given_features, prepared, item_ids, out)
        return
    require_raw_items(items, table, f"extract {feature_set}")
    expected = feature_set_of(read_card(weights))
    if feature_set != expected:
        raise ParamsError(
            f"feature set {feature_set!r} cannot be made from {weights}, which holds the "
            f"weights of feature set {expected!r}"
        )
    encoder = load_encoder(weights)
    metadata = {**feature_metadata(encoder, table, cfg), "feature_set": feature_set}
    given = None
    if feature_set == BASELINE and published is not None:
        given = published_image_features(published, item_ids)
    with world() as current:  # under torchrun: a shard of the items per rank
        image, text = extract_features(encoder, table, cfg, given is None, current)
    if not current.is_main:
        return  # rank 0 writes
    if given is not None:
        vectors, found = given
        image = finish(torch.from_numpy(vectors), cfg.normalize)
        metadata.update(image_source="amazon published CNN features (.b), mean-filled",
                        n_image_features_found=int(found.sum()))  # fmt: skip
    write_feature_store(out, item_ids, image, text, metadata)
    log.info("extract %s: %d items -> %s", feature_set, table.num_rows, out)


def _store_prepared(given: PreparedFeatures, path: Path, item_ids: np.ndarray, out: Path) -> None:
    """The cnn_st set from a prepared source's features (as given: MMRec's models read them
    unnormalised); the metadata names the source and its files' hashes."""
    check_item_rows(given.item_ids, len(item_ids), str(path), remedy("prepared_features"))
    source = given.metadata.get("source", "?")
    metadata = {
        "encoder": BASELINE,
        "arch": f"{source} prepared features",
        "pretrained": f"{source}: image_feat.npy + text_feat.npy",
        "weights_sha256": {k: v["sha256"] for k, v in given.metadata.get("files", {}).items()},
        "normalized": bool(given.metadata.get("normalized", False)),
        "aligned": False,
        "n_items": len(item_ids),
        "feature_set": BASELINE,
        "source": source,
        "image_source": f"{source} image_feat.npy, as given",
        "text_source": f"{source} text_feat.npy, as given",
    }
    write_feature_store(out, given.item_ids, given.image, given.text, metadata)
    log.info("extract %s: %d items from %s's prepared features -> %s",
             BASELINE, len(item_ids), source, out)  # fmt: skip
