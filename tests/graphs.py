"""Tiny interaction graphs with structure a recommender can learn, shared by the model tests."""

import numpy as np
import pyarrow as pa
from tables import interactions_table

from pipeline.data.interactions import InteractionData


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
    return interactions_table(*_clustered_rows(n_users, n_items, per_user, n_groups, seed))
