"""What the prepared sources (MMRec, LATTICE folders) share: their split written as the
interactions contract, ids kept when dense, their ``.npy`` features checked and kept, and,
given an Amazon 2014 metadata file for their ASINs, the items' titles, texts and images."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline.core.atomic import write_json
from pipeline.core.fetch import file_digest
from pipeline.data.amazon import LineStats
from pipeline.data.cnn_features import IMAGE_FEATURES_FILE, published_features_table
from pipeline.data.datasets import DatasetInfo, DatasetSpec
from pipeline.data.download import DownloadConfig, download_dataset, download_files, npy_error
from pipeline.data.images import placeholder_jpeg
from pipeline.data.prepared import PREPARED_FEATURES_FILE, prepared_table
from pipeline.data.preprocess import (
    INTERACTIONS_FILE,
    ITEMS_FILE,
    STATS_FILE,
    PreprocessConfig,
    build_items,
    read_item_meta,
)
from pipeline.data.schemas import INTERACTIONS, ITEMS, SPLITS, write_table

log = logging.getLogger(__name__)

IMAGE_FEAT, TEXT_FEAT = "image_feat.npy", "text_feat.npy"
NO_RAW_ITEMS = "ids, a split and .npy features only: no item images or texts (metadata) to encode"


AsinReader = Callable[[Path], "dict[int, str] | None"]  # reads an ASIN mapping file


@dataclass(frozen=True)
class MetaFiles(DatasetInfo):
    """A prepared folder's ASIN mapping and Amazon 2014 metadata file, read as a release's
    reviews and metadata: ``download_dataset`` then fetches the mapped items' images."""

    mapping: str = ""  # the ASIN mapping file (i_id_mapping.csv, item2id.json)
    meta_name: str = ""  # the metadata file (meta_<Category>.json.gz)
    read_mapping: AsinReader | None = field(default=None, compare=False)

    @property
    def reviews_file(self) -> str:
        return self.mapping

    @property
    def meta_file(self) -> str:
        return self.meta_name

    @property
    def publishes_image_features(self) -> bool:
        return False

    def reviews(self, path: Path, stats: LineStats) -> Iterator[dict]:
        """One record per mapped ASIN (the items whose images are wanted)."""
        for asin in sorted(set((self.read_mapping(path) or {}).values())):
            stats.read += 1
            yield {"reviewerID": "-", "asin": asin}


def download_prepared(
    dataset: str,
    spec: DatasetSpec,
    base: str,
    files: list[tuple[str, bool]],
    mapping: tuple[str, AsinReader],
    out_dir: Path,
    cfg: DownloadConfig,
) -> dict:
    """Fetch a prepared folder's ``files`` from ``base``; with ``spec.meta``, that metadata file
    too and each mapped item's image (``images/<asin>.jpg`` of a mirror, else its http(s)
    imUrl), the ASIN ``mapping`` file (name, reader) then being required."""
    summary = download_files(files, base, out_dir, dataset, cfg)
    if spec.meta:
        info = MetaFiles(dataset, dataset, False, mapping[0], spec.meta, mapping[1])
        cfg = replace(cfg, reviews_url=base, meta_url=base)
        mirror = Path(spec.mirror).expanduser() if spec.mirror else None
        summary["meta"] = download_dataset(info, out_dir, cfg, mirror)
    return summary


def require(path: Path, what: str) -> Path:
    """``path`` if it is a file, else FileNotFoundError naming it and what it should hold."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: it should hold {what} (has download run?)")
    return path


def _dense(ids: np.ndarray) -> bool:
    """Whether ``ids`` use exactly 0..n-1."""
    unique = np.unique(ids)
    return len(unique) > 0 and unique[0] == 0 and unique[-1] == len(unique) - 1


def load_features(path: Path, original_ids: np.ndarray, dense: bool) -> np.ndarray:
    """The rows of ``path`` (a .npy, row i = item i) for ``original_ids``, checked: [N, D]."""
    error = npy_error(require(path, "item features (row i = item i)"))
    if error is not None:
        raise ValueError(f"{path}: {error}; need [items, dim]")
    array = np.load(path, allow_pickle=False)
    needed = int(original_ids.max()) + 1
    if (dense and len(array) != needed) or len(array) < needed:
        raise ValueError(
            f"{path} has {len(array)} rows, but the interactions' item ids run 0..{needed - 1}: "
            f"row i must be item i's vector ({needed} rows)"
        )
    array = array[original_ids].astype(np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"{path} holds NaN or infinite values")
    return array


def write_prepared(
    frame: pl.DataFrame,
    asins: dict[int, str] | None,
    raw_dir: Path,
    out_dir: Path,
    source: str,
    where: str,
    meta: tuple[Path, MetaFiles] | None,
    cfg: PreprocessConfig,
) -> dict:
    """Write the processed files from a prepared split and ``raw_dir``'s .npy features.

    ``frame``: user, item (the source's int ids), rating, timestamp, split (train|valid|test),
    read from ``where`` (named in errors). Ids that are dense 0..n-1 are kept; others are
    re-indexed in sorted order (stats.json says so). ``asins``: original item id -> ASIN.
    With ``meta`` (the metadata file and its reader), the items get titles, texts and images
    (``raw_dir/images/<asin>.jpg``, decoded and resized by ``cfg``) as raw sources' do.
    """
    reindexed = {}
    for column, new in (("user", "user_id"), ("item", "item_id")):
        ids = frame[column].to_numpy()
        reindexed[column] = not _dense(ids)
        rank = pl.col(column).rank("dense") - 1 if reindexed[column] else pl.col(column)
        frame = frame.with_columns(rank.cast(pl.Int32).alias(new))
        if reindexed[column]:
            log.warning("%s: %s ids are not dense 0..n-1; re-indexed in sorted order",
                        where, column)  # fmt: skip
    missing = [s for s in SPLITS if not (frame["split"] == s).any()]
    if missing:
        raise ValueError(
            f"{where}: no interactions in split {missing}; each of {list(SPLITS)} needs some"
        )
    frame = frame.sort("user_id", "item_id")
    items = frame.select("item_id", "item").unique().sort("item_id")
    original = items["item"].to_numpy()
    image = load_features(raw_dir / IMAGE_FEAT, original, not reindexed["item"])
    text = load_features(raw_dir / TEXT_FEAT, original, not reindexed["item"])
    n_items, n_users = len(original), int(frame["user_id"].max()) + 1
    item_asins = [(asins or {}).get(int(i), str(int(i))) for i in original]

    interactions = pa.table(
        {
            "user_id": pa.array(frame["user_id"].to_numpy(), pa.int32()),
            "item_id": pa.array(frame["item_id"].to_numpy(), pa.int32()),
            "rating": pa.array(frame["rating"].to_numpy().astype(np.float32), pa.float32()),
            "timestamp": pa.array(frame["timestamp"].to_numpy().astype(np.int64), pa.int64()),
            "split": pa.array(frame["split"].to_list(), pa.string()),
        }
    )
    item_counts: dict[str, int] = {}
    if meta is not None:
        if asins is None:
            raise FileNotFoundError(
                f"{where}: {meta[1].mapping} (the items' ASINs) is missing, so the metadata "
                f"{meta[0].name} cannot be joined to the items"
            )
        records, _ = read_item_meta(require(meta[0], "Amazon 2014 metadata"), set(item_asins),
                                    meta[1])  # fmt: skip
        items_table, item_counts = build_items(raw_dir, item_asins, records, cfg)
        raw_items = f"titles, texts and images from {meta[0].name}"
    else:
        placeholder = placeholder_jpeg()
        items_table = pa.table(
            {
                "item_id": pa.array(np.arange(n_items), pa.int32()),
                "asin": pa.array(item_asins, pa.string()),
                "title": pa.array([""] * n_items, pa.string()),
                "text": pa.array([""] * n_items, pa.string()),
                "image_path": pa.array([None] * n_items, pa.string()),
                "image_bytes": pa.array([placeholder] * n_items, pa.binary()),
                "has_image": pa.array([False] * n_items, pa.bool_()),
            }
        )
        raw_items = NO_RAW_ITEMS
    item_meta = {"source": source, "raw_items": raw_items}
    files = {}
    for name in (IMAGE_FEAT, TEXT_FEAT):
        size, digest = file_digest(raw_dir / name)
        files[name] = {"bytes": size, "sha256": digest}
    prepared = prepared_table(
        np.arange(n_items, dtype=np.int32),
        image,
        text,
        {"source": source, "files": files, "normalized": False},
    )
    empty_published, _ = published_features_table(item_asins, None)
    stats = {
        "source": source,
        "users": n_users,
        "items": n_items,
        "interactions": frame.height,
        "density": frame.height / (n_users * n_items),
        **{f"{s}_interactions": int((frame["split"] == s).sum()) for s in SPLITS},
        "reindexed_users": reindexed["user"],
        "reindexed_items": reindexed["item"],
        "items_with_asin": sum(int(i) in (asins or {}) for i in original),
        "image_dim": int(image.shape[1]),
        "text_dim": int(text.shape[1]),
        "raw_items": raw_items,
        **item_counts,
    }
    write_table(interactions, out_dir / INTERACTIONS_FILE, INTERACTIONS, "interactions")
    write_table(items_table, out_dir / ITEMS_FILE, ITEMS.with_metadata(item_meta), "items")
    write_table(
        empty_published, out_dir / IMAGE_FEATURES_FILE, empty_published.schema, "image_features"
    )
    write_table(prepared, out_dir / PREPARED_FEATURES_FILE, prepared.schema, "prepared_features")
    write_json(out_dir / STATS_FILE, stats)
    log.info(
        "%s: %d users, %d items, %d interactions, split kept (%s)",
        where, n_users, n_items, frame.height,
        ", ".join(f"{s} {stats[f'{s}_interactions']}" for s in SPLITS),
    )  # fmt: skip
    return stats
