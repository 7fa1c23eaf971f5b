"""The data contracts between stages, as pyarrow schemas, validated on write and on read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.atomic import atomic_path

SPLITS = ("train", "valid", "test")
# The stage that writes each contract's file: re-running it re-creates a damaged file.
WRITTEN_BY = {
    "interactions": "preprocess",
    "items": "preprocess",
    "image_features": "preprocess",
    "prepared_features": "preprocess",
}
# One training run's folder: models/<dataset>/<feature_set>/<model>/seed-<seed>/.
SEED_PREFIX = "seed-"


def seed_folder(seed: int) -> str:
    """The folder name of the run with training ``seed``, under its model's folder."""
    return f"{SEED_PREFIX}{seed}"


INTERACTIONS = pa.schema(
    [
        pa.field("user_id", pa.int32(), nullable=False),
        pa.field("item_id", pa.int32(), nullable=False),
        pa.field("rating", pa.float32(), nullable=False),
        pa.field("timestamp", pa.int64(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
    ]
)

ITEMS = pa.schema(
    [
        pa.field("item_id", pa.int32(), nullable=False),
        pa.field("asin", pa.string(), nullable=False),
        pa.field("title", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("image_path", pa.string(), nullable=True),
        pa.field("image_bytes", pa.binary(), nullable=False),
        pa.field("has_image", pa.bool_(), nullable=False),
    ]
)


# A prepared source's own item features (MMRec's, LATTICE's .npy), one row per item, the
# extract stage's cnn_st set; no rows for raw sources. Lists of any length: dims are metadata.
PREPARED_FEATURES = pa.schema(
    [
        pa.field("item_id", pa.int32(), nullable=False),
        pa.field("image", pa.list_(pa.float32()), nullable=False),
        pa.field("text", pa.list_(pa.float32()), nullable=False),
    ]
)


def feature_schema(image_dim: int, text_dim: int, metadata: dict[str, str]) -> pa.Schema:
    """Schema of ``features/<dataset>/<feature_set>/items.parquet``.

    ``metadata`` records the encoder, weights hash, dims and normalisation.
    """
    return pa.schema(
        [
            pa.field("item_id", pa.int32(), nullable=False),
            pa.field("image", pa.list_(pa.float32(), image_dim), nullable=False),
            pa.field("text", pa.list_(pa.float32(), text_dim), nullable=False),
        ],
        metadata={k: str(v) for k, v in metadata.items()},
    )


class ContractError(ValueError):
    """A table does not match the data contract it claims to follow."""


def validate(table: pa.Table, schema: pa.Schema, name: str) -> pa.Table:
    """Check ``table`` against ``schema`` (column names, types, nulls); return it cast."""
    missing = [f.name for f in schema if f.name not in table.column_names]
    extra = [c for c in table.column_names if c not in schema.names]
    if missing or extra:
        raise ContractError(f"{name}: missing columns {missing}, unexpected columns {extra}")
    table = table.select(schema.names)
    for field in schema:
        col = table.column(field.name)
        if not col.type.equals(field.type):
            raise ContractError(
                f"{name}: column {field.name!r} is {col.type}, expected {field.type}"
            )
        if not field.nullable and col.null_count:
            raise ContractError(f"{name}: column {field.name!r} has {col.null_count} nulls")
    if "split" in schema.names:
        bad = set(table.column("split").unique().to_pylist()) - set(SPLITS)
        if bad:
            raise ContractError(f"{name}: split has values {sorted(bad)}, allowed {list(SPLITS)}")
    return table.cast(schema)


def remedy(name: str) -> str:
    """What to do about a missing or damaged ``name`` file: run the stage that writes it."""
    stage = WRITTEN_BY.get(name)
    return f"(re)create it with `dvc repro {stage}`" if stage else "run the stage that writes it"


def dense_ids(ids: np.ndarray, column: str, name: str, unique: bool = False) -> int:
    """Check that ``ids`` use every integer in 0..n-1 (as re-indexing leaves them); return n.

    Every id has a row, so n <= rows: a corrupt, huge id fails here before anything sized by
    it is allocated. With ``unique``, each id must have exactly one row.
    """
    if len(ids) == 0:
        return 0
    low, high = int(ids.min()), int(ids.max())
    if low < 0:
        raise ContractError(f"{name}: {column} {low} is negative; ids run 0..n-1")
    if high >= len(ids):
        raise ContractError(
            f"{name}: {column} {high} is impossible in {len(ids)} rows: ids must be dense "
            f"0..n-1 with n <= rows (the table is damaged or not the contract's)"
        )
    counts = np.bincount(ids, minlength=high + 1)
    unused = np.flatnonzero(counts == 0)
    if len(unused):
        raise ContractError(
            f"{name}: {column} runs 0..{high} but never uses {len(unused)} of those ids "
            f"(first: {unused[:5].tolist()}); ids must be dense 0..n-1"
        )
    if unique and counts.max() > 1:
        twice = np.flatnonzero(counts > 1)
        raise ContractError(
            f"{name}: {column} repeats ids {twice[:5].tolist()} ({len(twice)} in all); "
            "each id must have exactly one row"
        )
    return high + 1


def check_item_rows(item_ids: np.ndarray, n_items: int, where: str, todo: str) -> None:
    """Raise unless ``item_ids`` (of an items table or a feature store at ``where``) are the
    interactions' items 0..n_items-1 once each, so every item a model scores has its row."""
    ids = np.asarray(item_ids, dtype=np.int64)
    expected = np.arange(n_items)
    if len(ids) == n_items and np.array_equal(np.sort(ids), expected):
        return
    missing = np.setdiff1d(expected, ids)[:5].tolist()
    beyond = np.setdiff1d(ids, expected)[:5].tolist()
    raise ContractError(
        f"{where}: item_id must hold the interactions' items 0..{n_items - 1} once each, but "
        f"it has {len(ids)} rows, lacks {missing or 'none'} and has {beyond or 'none'} beyond "
        f"them (first five): {todo}"
    )


def check_content(table: pa.Table, schema: pa.Schema, name: str) -> pa.Table:
    """Check what the code relies on beyond types, in the columns ``table`` has: interactions
    have dense user and item ids and rows in every split; items have each id 0..n-1 once."""
    if schema.equals(INTERACTIONS):
        for column in ("user_id", "item_id"):
            if column in table.column_names:
                dense_ids(table.column(column).to_numpy(), column, name)
        if "split" in table.column_names:
            present = set(pc.unique(table.column("split")).to_pylist())
            empty = [s for s in SPLITS if s not in present]
            if empty:
                raise ContractError(
                    f"{name}: no rows in split {empty}; each of {list(SPLITS)} needs rows"
                )
    elif schema.equals(ITEMS) and "item_id" in table.column_names:
        dense_ids(table.column("item_id").to_numpy(), "item_id", name, unique=True)
    return table


def write_table(table: pa.Table, path: str | Path, schema: pa.Schema, name: str) -> None:
    """Validate ``table`` against ``schema`` and write it to ``path`` as Parquet, atomically,
    with page checksums so that a later read detects damaged pages."""
    table = check_content(validate(table, schema, name), schema, name)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, write_page_checksum=True)


def read_parquet(path: str | Path, todo: str, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet file (page checksums verified where written); a missing, corrupt or
    truncated file raises naming it, with ``todo`` (what to do about it)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {todo}")
    try:
        return pq.read_table(path, columns=columns, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as exc:
        raise ContractError(f"{path} is unreadable, damaged or truncated ({exc}): {todo}") from exc


def read_table(
    path: str | Path, schema: pa.Schema, name: str, columns: list[str] | None = None
) -> pa.Table:
    """Read a Parquet file (or only its ``columns``) and check it against ``schema``; errors
    name the file and say how to re-create it."""
    todo = remedy(name)
    table = read_parquet(path, todo, columns)
    fields = schema if columns is None else pa.schema([schema.field(c) for c in columns])
    label = f"{name} {path}"
    try:
        return check_content(validate(table, fields, label), schema, label)
    except ContractError as exc:
        raise ContractError(f"{exc}; {todo}") from None
