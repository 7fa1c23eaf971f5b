"""Tiny interaction graphs with structure a recommender can learn, shared by the model tests."""

import numpy as np
import pyarrow as pa

from pipeline.interactions import InteractionData
from pipeline.schemas import INTERACTIONS, validate


def _clustered_rows(
    n_users: int, n_items: int, per_user: int, n_groups: int, seed: int
) -> tuple[list[int], list[int], list[str]]:
    rng = np.random.default_rng(seed)
    users, items = [], []
    for u in range(n_users):
        group = np.flatnonzero(np.arange(n_items) % n_groups == u % n_groups)
        users += [u] * per_user
        items += rng.choice(group, per_user, replace=False).tolist()
    splits = (["train"] * (per_user - 2) + ["valid", "test"]) * n_users
    return users, items, splits


def clustered(
    n_users: int, n_items: int, per_user: int, n_groups: int, seed: int = 0
) -> InteractionData:
    """User u likes only the items of group u % n_groups (item i is in group i % n_groups);
    each user has per_user - 2 train items, one valid and one test."""
    users, items, splits = _clustered_rows(n_users, n_items, per_user, n_groups, seed)
    return InteractionData.from_arrays(users, items, splits, n_users, n_items)


def clustered_table(
    n_users: int, n_items: int, per_user: int, n_groups: int, seed: int = 0
) -> pa.Table:
    """``clustered`` as an interactions table (the INTERACTIONS contract)."""
    users, items, splits = _clustered_rows(n_users, n_items, per_user, n_groups, seed)
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
