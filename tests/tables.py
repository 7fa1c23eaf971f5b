"""Small processed-data tables shared by the tests."""

import io

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.data.schemas import INTERACTIONS, ITEMS, validate


def imageless_items(ids: np.ndarray, title: str = "Title {}") -> pa.Table:
    """An items table (the ITEMS contract) of ``ids``, titled by ``title``, with no images."""
    n = len(ids)
    return pa.table(
        {
            "item_id": pa.array(ids, pa.int32()),
            "asin": [f"A{i}" for i in ids],
            "title": [title.format(i) for i in ids],
            "text": [f"text {i}" for i in ids],
            "image_path": pa.nulls(n, pa.string()),
            "image_bytes": pa.array([b""] * n, pa.binary()),
            "has_image": pa.array([False] * n),
        }
    )


def jpeg(rgb: tuple[int, int, int], size: tuple[int, int] = (40, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, "JPEG")
    return buf.getvalue()


def make_items(n: int) -> pa.Table:
    """n items with distinct colours and texts of very different lengths."""
    rng = np.random.default_rng(0)
    rows = {
        "item_id": pa.array(range(n), pa.int32()),
        "asin": [f"B{i:09d}" for i in range(n)],
        "title": [f"item {i}" for i in range(n)],
        "text": [" ".join(["word"] * (1 + (7 * i) % 11) + [f"item{i}"]) for i in range(n)],
        "image_path": pa.array([None] * n, pa.string()),
        "image_bytes": [jpeg(tuple(int(c) for c in rng.integers(0, 255, 3))) for _ in range(n)],
        "has_image": [i % 3 != 0 for i in range(n)],
    }
    return validate(pa.table(rows), ITEMS, "items")


def interactions_table(users: list[int], items: list[int], splits: list[str]) -> pa.Table:
    """An interactions table (the INTERACTIONS contract): rating 5, timestamps in row order."""
    n = len(users)
    table = pa.table(
        {
            "user_id": pa.array(users, pa.int32()),
            "item_id": pa.array(items, pa.int32()),
            "rating": pa.array(np.full(n, 5.0, np.float32)),
            "timestamp": pa.array(np.arange(n), pa.int64()),
            "split": pa.array(splits),
        }
    )
    return validate(table, INTERACTIONS, "interactions")
