"""Small processed-data tables shared by the tests."""

import numpy as np
import pyarrow as pa


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
