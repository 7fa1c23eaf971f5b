"""The feature store: one Parquet file plus two FAISS indexes per feature set.

A feature set folder ``features/<dataset>/<feature_set>/`` holds

- ``items.parquet``: one row per item, ``item_id`` int32, ``image`` and ``text`` as fixed-size
  lists of float32 (``pipeline.data.schemas.feature_schema``). The schema metadata records the
  encoder, arch, pretrained tag, weights sha256, dims, normalisation and how many items have a
  real image; each value is stored JSON-encoded (so numbers and booleans round-trip).
- ``image.faiss`` and ``text.faiss``: exact inner-product indexes (``IndexFlatIP`` inside an
  ``IndexIDMap2``) whose ids are the ``item_id`` values, so a search returns item ids directly,
  whatever their order. On L2-normalised vectors the inner product is the cosine similarity.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.atomic import atomic_path
from pipeline.data.schemas import (
    ContractError,
    check_item_rows,
    feature_schema,
    read_parquet,
    validate,
)
from pipeline.features.names import extract_stage

log = logging.getLogger(__name__)

ITEMS_FILE = "items.parquet"
MODALITIES = ("image", "text")
REQUIRED_METADATA = ("encoder", "arch", "pretrained", "weights_sha256", "normalized")


@dataclass(frozen=True)
class FeatureSet:
    """A feature set read back: ``image`` [N, D_i] and ``text`` [N, D_t] float32, row i is
    item ``item_ids[i]``; ``metadata`` is the decoded schema metadata."""

    item_ids: np.ndarray
    image: np.ndarray
    text: np.ndarray
    metadata: dict


def _faiss_index(item_ids: np.ndarray, vectors: np.ndarray) -> faiss.Index:
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    index.add_with_ids(np.ascontiguousarray(vectors), item_ids.astype(np.int64))
    return index


def write_feature_store(
    out_dir: str | Path,
    item_ids: np.ndarray,
    image: np.ndarray,
    text: np.ndarray,
    metadata: dict,
) -> None:
    """Write ``items.parquet``, ``image.faiss`` and ``text.faiss`` into ``out_dir`` atomically.

    ``metadata`` must hold at least ``REQUIRED_METADATA``; ``image_dim``/``text_dim`` are added.
    """
    item_ids = np.asarray(item_ids)
    image = np.asarray(image, dtype=np.float32)
    text = np.asarray(text, dtype=np.float32)
    n = len(item_ids)
    if item_ids.ndim != 1 or image.ndim != 2 or text.ndim != 2 or len(image) != n or len(text) != n:
        raise ValueError(
            f"need item_ids [N], image [N, D_i], text [N, D_t]; got shapes "
            f"{item_ids.shape}, {image.shape}, {text.shape}"
        )
    if len(np.unique(item_ids)) != n:
        raise ValueError("item_ids are not unique")
    if not (np.isfinite(image).all() and np.isfinite(text).all()):
        raise ValueError("features contain NaN or inf")
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise ValueError(f"feature metadata lacks {missing}; required: {list(REQUIRED_METADATA)}")
    meta = {**metadata, "image_dim": image.shape[1], "text_dim": text.shape[1]}
    schema = feature_schema(
        image.shape[1], text.shape[1], {k: json.dumps(v) for k, v in meta.items()}
    )
    table = pa.table(
        {
            "item_id": pa.array(item_ids, pa.int32()),
            "image": pa.FixedSizeListArray.from_arrays(pa.array(image.ravel()), image.shape[1]),
            "text": pa.FixedSizeListArray.from_arrays(pa.array(text.ravel()), text.shape[1]),
        }
    )
    table = validate(table, schema, "feature store").replace_schema_metadata(schema.metadata)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        pq.write_table(table, tmp / ITEMS_FILE)
        for name, vectors in (("image", image), ("text", text)):
            faiss.write_index(_faiss_index(item_ids, vectors), str(tmp / f"{name}.faiss"))
    log.info(
        "wrote %d items' features (%d + %d dims) to %s", n, image.shape[1], text.shape[1], out_dir
    )


def _to_numpy(column: pa.ChunkedArray, dim: int) -> np.ndarray:
    flat = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return flat.astype(np.float32, copy=False).reshape(-1, dim)


def read_feature_store(feature_dir: str | Path, n_items: int | None = None) -> FeatureSet:
    """Read and validate a feature set folder's ``items.parquet``; a missing, damaged or
    truncated file raises naming it. With ``n_items`` (the interactions'), its item ids must
    be exactly 0..n_items-1."""
    path = Path(feature_dir) / ITEMS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (has the extract stage run?)")
    todo = f"(re)create it with `dvc repro {extract_stage(path.parent.name)}`"
    table = read_parquet(path, todo)
    file_schema = table.schema
    dims = {}
    for name in MODALITIES:
        if name not in file_schema.names or not pa.types.is_fixed_size_list(
            file_schema.field(name).type
        ):
            raise ContractError(f"{path}: column {name!r} is missing or not a fixed-size list")
        dims[name] = file_schema.field(name).type.list_size
    table = validate(table, feature_schema(dims["image"], dims["text"], {}), str(path))
    metadata = {k.decode(): json.loads(v) for k, v in (file_schema.metadata or {}).items()
                if not k.startswith(b"ARROW:")}  # fmt: skip
    for name in MODALITIES:
        if metadata.get(f"{name}_dim") != dims[name]:
            raise ContractError(f"{path}: metadata {name}_dim disagrees with the {name} column")
    item_ids = table.column("item_id").to_numpy()
    if n_items is not None:
        check_item_rows(item_ids, n_items, str(path), todo)
    elif len(np.unique(item_ids)) != len(item_ids):
        raise ContractError(f"{path}: item_id repeats ids; each item needs one row: {todo}")
    return FeatureSet(
        item_ids=item_ids,
        image=_to_numpy(table.column("image"), dims["image"]),
        text=_to_numpy(table.column("text"), dims["text"]),
        metadata=metadata,
    )


def nearest_items(
    feature_dir: str | Path, item_id: int, modality: str = "image", k: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` items most similar to ``item_id`` in one modality (itself excluded).

    Returns item ids [k] (int64) and their inner-product scores [k] (float32), best first.
    """
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; allowed: {list(MODALITIES)}")
    index = faiss.read_index(str(Path(feature_dir) / f"{modality}.faiss"))
    try:
        query = index.reconstruct(int(item_id))[None, :]
    except RuntimeError:
        raise KeyError(
            f"item_id {item_id} is not in the {modality} index of {feature_dir}"
        ) from None
    scores, ids = index.search(query, min(k + 1, index.ntotal))
    keep = (ids[0] != item_id) & (ids[0] >= 0)
    return ids[0][keep][:k], scores[0][keep][:k]
