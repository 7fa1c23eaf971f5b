"""A prepared source's own item features (``prepared_features.parquet``), written by preprocess.

MMRec and LATTICE folders ship ``image_feat.npy`` (Amazon's 4096-d CNN vectors) and
``text_feat.npy`` (sentence-transformer vectors), row i being item i. Preprocess keeps them as
given in this table, and the extract stage turns them into the ``cnn_st`` feature set. Raw
sources write the table with no rows, so that it is always there for DVC.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.data.schemas import PREPARED_FEATURES, read_table

PREPARED_FEATURES_FILE = "prepared_features.parquet"  # next to items.parquet


@dataclass(frozen=True)
class PreparedFeatures:
    """Rows of ``prepared_features.parquet``: image [N, D_i], text [N, D_t] float32 of
    ``item_ids`` [N]; ``metadata`` says where they came from (decoded from JSON)."""

    item_ids: np.ndarray
    image: np.ndarray
    text: np.ndarray
    metadata: dict


def prepared_table(
    item_ids: np.ndarray, image: np.ndarray, text: np.ndarray, metadata: dict
) -> pa.Table:
    """The table of ``prepared_features.parquet``; metadata values stored JSON-encoded."""
    image = np.ascontiguousarray(image, np.float32)
    text = np.ascontiguousarray(text, np.float32)
    n = len(item_ids)
    if image.shape[0] != n or text.shape[0] != n or image.ndim != 2 or text.ndim != 2:
        raise ValueError(
            f"need image [N, D_i] and text [N, D_t] for N = {n} items; "
            f"got {image.shape} and {text.shape}"
        )
    meta = {**metadata, "image_dim": int(image.shape[1]), "text_dim": int(text.shape[1])}

    def lists(matrix: np.ndarray) -> pa.ListArray:
        offsets = np.arange(n + 1, dtype=np.int64) * matrix.shape[1]
        return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(matrix.ravel()))

    return pa.table(
        {"item_id": pa.array(item_ids, pa.int32()), "image": lists(image), "text": lists(text)},
        schema=PREPARED_FEATURES.with_metadata({k: json.dumps(v) for k, v in meta.items()}),
    )


def no_prepared_features() -> pa.Table:
    """The table a raw source writes: no rows (its features are extracted from the items)."""
    empty = np.empty((0, 1), np.float32)
    meta = {"source": "none: the features are extracted from the items"}
    return prepared_table(np.empty(0, np.int32), empty, empty, meta)


def read_prepared(path: str | Path) -> PreparedFeatures | None:
    """The prepared features at ``path``; None when the table has no rows (a raw source)."""
    table = read_table(path, PREPARED_FEATURES, "prepared_features")
    if table.num_rows == 0:
        return None
    raw = pq.read_schema(path).metadata or {}
    meta = {k.decode(): json.loads(v) for k, v in raw.items() if not k.startswith(b"ARROW:")}

    def matrix(column: str) -> np.ndarray:
        flat = table.column(column).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return flat.astype(np.float32, copy=False).reshape(table.num_rows, meta[f"{column}_dim"])

    return PreparedFeatures(
        table.column("item_id").to_numpy(), matrix("image"), matrix("text"), meta
    )


def require_raw_items(path: str | Path, items: pa.Table, needs: str) -> None:
    """Raise unless some item of ``items`` (read from ``path``) has an image or a text: a
    prepared source without metadata has neither, and ``needs`` (e.g. "extract clip-pretrained")
    cannot run on it. The message names the source and what is missing."""
    has_image = pc.any(items.column("has_image")).as_py()
    has_text = pc.any(pc.greater(pc.utf8_length(items.column("text")), 0)).as_py()
    if has_image or has_text:
        return
    meta = pq.read_schema(path).metadata or {}
    source = meta.get(b"source", b"?").decode()
    what = meta.get(b"raw_items", b"no item images or texts").decode()
    raise ValueError(
        f"{needs} needs item images and texts, but {path} has none: dataset source {source!r} "
        f"gave {what}. The ID-only models (train_id) and the cnn_st feature set (from the "
        "source's .npy features) run without them"
    )
