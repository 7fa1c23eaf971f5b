"""The data contracts between stages, as pyarrow schemas, validated on write and on read."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atomic import atomic_path

SPLITS = ("train", "valid", "test")
# The feature-set name of ID-only runs: models/<dataset>/id/<model>/ (BPR, LightGCN).
ID_ONLY = "id"

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


def write_table(table: pa.Table, path: str | Path, schema: pa.Schema, name: str) -> None:
    """Validate ``table`` against ``schema`` and write it to ``path`` as Parquet, atomically."""
    table = validate(table, schema, name)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_table(path: str | Path, schema: pa.Schema, name: str) -> pa.Table:
    """Read a Parquet file and check it against ``schema``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{name}: {path} does not exist (has its stage run?)")
    return validate(pq.read_table(path), schema, name)
