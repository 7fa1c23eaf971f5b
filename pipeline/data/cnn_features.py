"""Amazon's published CNN image features (the paper's baseline image side, as MMRec uses them).

``image_features_<Category>.b`` (McAuley et al.) is a run of records, each a 10-byte ASIN then
4096 little-endian float32 (FC7 of a Caffe reference net). ``preprocess`` keeps the vectors of
its items in ``image_features.parquet`` (item_id, image: rows only for items with a vector);
the extract stage reads them back with ``published_image_features``, giving items without a
vector the mean of those with one (MMRec's fill), and a mask of which were found.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.data.amazon import ASIN_BYTES, FEATURE_DIM
from pipeline.data.schemas import read_table, validate

log = logging.getLogger(__name__)

RECORD = np.dtype([("asin", f"S{ASIN_BYTES}"), ("vector", "<f4", (FEATURE_DIM,))])
IMAGE_FEATURES_FILE = "image_features.parquet"  # written by preprocess next to items.parquet
IMAGE_FEATURES = pa.schema(
    [
        pa.field("item_id", pa.int32(), nullable=False),
        pa.field("image", pa.list_(pa.float32(), FEATURE_DIM), nullable=False),
    ]
)


@dataclass(frozen=True)
class ImageFeatureStats:
    """What reading a ``.b`` file found."""

    records: int  # complete records in the file
    kept: int  # records returned (every first occurrence, or those whose ASIN was asked for)
    duplicates: int  # records whose ASIN an earlier record already had (skipped)
    truncated_bytes: int  # size of an incomplete trailing record; 0 when the file is whole

    @property
    def truncated_records(self) -> int:
        """1 when the file ends in an incomplete record (it is skipped), else 0."""
        return int(self.truncated_bytes > 0)


def read_image_features(
    path: str | Path, keep: Collection[str] | None = None, chunk_records: int = 1024
) -> tuple[list[str], np.ndarray, ImageFeatureStats]:
    """Stream a ``.b`` file: ASINs, their vectors [N, 4096] float32, and counts.

    Only the first record of an ASIN counts; with ``keep``, only the ASINs it holds are kept (a
    whole category file can be far larger than memory). The output array is allocated once and
    filled chunk by chunk. An incomplete trailing record is skipped with a warning.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image features file {path} does not exist")
    if chunk_records < 1:
        raise ValueError(f"chunk_records = {chunk_records}; use at least 1")
    n_records, truncated = divmod(path.stat().st_size, RECORD.itemsize)
    wanted = None if keep is None else set(keep)
    vectors = np.empty(
        (n_records if wanted is None else min(n_records, len(wanted)), FEATURE_DIM), np.float32
    )
    asins: list[str] = []
    seen: set[str] = set()
    duplicates = 0
    buffer = np.empty(chunk_records, RECORD)
    with (
        open(path, "rb") as fh,
        tqdm(total=n_records, desc=path.name, unit=" records", disable=None) as bar,
    ):
        for start in range(0, n_records, chunk_records):
            chunk = buffer[: min(chunk_records, n_records - start)]
            if fh.readinto(chunk.view(np.uint8)) != chunk.nbytes:
                raise OSError(f"{path} changed while being read")
            rows = []
            for row, raw in enumerate(chunk["asin"].tolist()):
                asin = raw.decode("ascii", "replace").strip()
                if asin in seen:
                    duplicates += 1
                elif wanted is None or asin in wanted:
                    seen.add(asin)
                    asins.append(asin)
                    rows.append(row)
            vectors[len(asins) - len(rows) : len(asins)] = chunk["vector"][rows]
            bar.update(len(chunk))
    vectors.resize((len(asins), FEATURE_DIM), refcheck=False)  # in place: no second copy
    if truncated:
        log.warning(
            "%s: the last record is truncated (%d of %d bytes); skipped",
            path,
            truncated,
            RECORD.itemsize,
        )
    if duplicates:
        log.warning(
            "%s: %d records repeat an earlier ASIN; the first one is kept", path, duplicates
        )
    return asins, vectors, ImageFeatureStats(n_records, len(asins), duplicates, truncated)


def _mean_filled(vectors: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``vectors[rows]`` where rows >= 0, the mean of those rows where -1; and the found mask."""
    found = rows >= 0
    if not found.any():
        raise ValueError(f"none of the {len(rows)} items has a published image vector")
    matrix = np.empty((len(rows), vectors.shape[1]), np.float32)
    matrix[found] = vectors[rows[found]]
    matrix[~found] = matrix[found].mean(axis=0, dtype=np.float64)
    return matrix, found


def align_to_items(
    asins_of_items: Sequence[str], asins: Sequence[str], vectors: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Row i = the vector of item i's ASIN: [n_items, D] float32, and a found mask [n_items].

    Items without a vector get the mean of the found items' vectors, as MMRec does.
    """
    if len(asins) != len(vectors):
        raise ValueError(f"{len(asins)} ASINs but {len(vectors)} vectors")
    index: dict[str, int] = {}
    for row, asin in enumerate(asins):
        index.setdefault(asin, row)
    rows = np.array([index.get(a, -1) for a in asins_of_items], np.int64)
    return _mean_filled(vectors, rows)


def published_features_table(
    item_asins: Sequence[str], features_path: str | Path | None
) -> tuple[pa.Table, dict[str, int | bool]]:
    """The ``image_features.parquet`` table of the items (item id = position in
    ``item_asins``) that have a vector in ``features_path``, and counts for stats.json.

    No file (or None: the source has none): an empty table. The schema metadata records
    ``items``, ``found``, ``source`` and ``source_exists``, so the table is written (and a DVC
    out) whether or not the file exists.
    """
    features_path = None if features_path is None else Path(features_path)
    exists = features_path is not None and features_path.is_file()
    stats = ImageFeatureStats(0, 0, 0, 0)
    item_ids = np.empty(0, np.int32)
    vectors = np.empty((0, FEATURE_DIM), np.float32)
    if exists:
        asins, vectors, stats = read_image_features(features_path, keep=set(item_asins))
        index = {a: row for row, a in enumerate(asins)}
        item_ids = np.array([i for i, a in enumerate(item_asins) if a in index], np.int32)
        vectors = vectors[[index[item_asins[i]] for i in item_ids]]
        log.info(
            "%s: image vectors for %d of %d items",
            features_path.name,
            len(item_ids),
            len(item_asins),
        )
    counts: dict[str, int | bool] = {
        "image_features_file": exists,
        "image_features_records": stats.records,
        "image_features_duplicates": stats.duplicates,
        "image_features_truncated_bytes": stats.truncated_bytes,
        "image_features_found": len(item_ids),
    }
    metadata = {
        "items": str(len(item_asins)),
        "found": str(len(item_ids)),
        "source": "none" if features_path is None else features_path.name,
        "source_exists": str(exists).lower(),
        "feature_dim": str(FEATURE_DIM),
    }
    table = pa.table(
        {
            "item_id": pa.array(item_ids, pa.int32()),
            "image": pa.FixedSizeListArray.from_arrays(
                pa.array(vectors.reshape(-1), pa.float32()), FEATURE_DIM
            ),
        },
        schema=IMAGE_FEATURES.with_metadata(metadata),
    )
    return validate(table, table.schema, "image_features"), counts


def published_image_features(
    path: str | Path, item_ids: Sequence[int] | np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """The published vectors of ``item_ids`` from ``image_features.parquet``, mean-filled
    ([n, 4096] float32), and the found mask [n]; None when the table has no rows (the demo, or
    no ``.b`` file), meaning the CNN's own features are to be used."""
    table = read_table(path, IMAGE_FEATURES, "image_features")
    if table.num_rows == 0:
        meta = pq.read_schema(path).metadata or {}
        log.info(
            "%s has no rows (source file present: %s)",
            path,
            meta.get(b"source_exists", b"?").decode(),
        )
        return None
    ids = table["item_id"].to_numpy()
    vectors = table["image"].combine_chunks().flatten().to_numpy().reshape(-1, FEATURE_DIM)
    index = {int(i): row for row, i in enumerate(ids)}
    rows = np.array([index.get(int(i), -1) for i in item_ids], np.int64)
    return _mean_filled(vectors, rows)
