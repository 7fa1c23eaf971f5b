"""The processed interactions as the recommenders see them: train graph + held-out items."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import scipy.sparse as sp
import torch

from pipeline.data.schemas import INTERACTIONS, SPLITS, check_content, read_table, validate

log = logging.getLogger(__name__)

EVAL_SPLITS = ("valid", "test")


def _binary_csr(users: np.ndarray, items: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """A 0/1 user x item CSR matrix (duplicates collapse), indices sorted within each row."""
    mat = sp.csr_matrix(
        (np.ones(len(users), dtype=np.float32), (users, items)), shape=shape, dtype=np.float32
    )
    mat.sum_duplicates()
    mat.data[:] = 1.0
    mat.sort_indices()
    return mat


@dataclass(frozen=True, eq=False)
class InteractionData:
    """One dataset's interactions, split into a train graph and per-user valid/test items.

    ``train``, ``valid`` and ``test`` are binary CSR matrices [n_users, n_items]; row ``u``
    lists user ``u``'s items of that split (sorted, unique). ``train_users``/``train_items``
    are the unique train pairs (int64, sorted by user then item), the positives of BPR.
    """

    n_users: int
    n_items: int
    train: sp.csr_matrix
    valid: sp.csr_matrix
    test: sp.csr_matrix

    @cached_property
    def train_users(self) -> np.ndarray:
        """User id of each unique train pair, [n_train] int64."""
        return np.repeat(np.arange(self.n_users, dtype=np.int64), np.diff(self.train.indptr))

    @cached_property
    def train_items(self) -> np.ndarray:
        """Item id of each unique train pair, [n_train] int64."""
        return self.train.indices.astype(np.int64)

    @property
    def n_train(self) -> int:
        """Number of unique train (user, item) pairs."""
        return int(self.train.nnz)

    def split_matrix(self, split: str) -> sp.csr_matrix:
        """The CSR matrix of ``split`` (train | valid | test)."""
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is unknown; allowed: {list(SPLITS)}")
        return getattr(self, split)

    def eval_users(self, split: str) -> np.ndarray:
        """Users with at least one item in ``split`` (valid | test), sorted, int64."""
        if split not in EVAL_SPLITS:
            raise ValueError(f"cannot evaluate on split {split!r}; allowed: {list(EVAL_SPLITS)}")
        return np.flatnonzero(np.diff(self.split_matrix(split).indptr)).astype(np.int64)

    def items_of(self, split: str, user: int) -> np.ndarray:
        """The items of ``user`` in ``split``, sorted."""
        mat = self.split_matrix(split)
        return mat.indices[mat.indptr[user] : mat.indptr[user + 1]]

    def train_item_counts(self) -> np.ndarray:
        """How many train users each item has, [n_items] int64 (its popularity)."""
        return np.bincount(self.train.indices, minlength=self.n_items).astype(np.int64)

    def train_tensor(self) -> torch.Tensor:
        """The train graph as a torch sparse COO tensor [n_users, n_items] of ones (float32)."""
        index = torch.from_numpy(np.stack([self.train_users, self.train_items]))
        values = torch.ones(self.n_train, dtype=torch.float32)
        return torch.sparse_coo_tensor(
            index, values, (self.n_users, self.n_items), is_coalesced=True, check_invariants=True
        )

    @classmethod
    def from_arrays(
        cls,
        users: np.ndarray,
        items: np.ndarray,
        splits: np.ndarray,
        n_users: int | None = None,
        n_items: int | None = None,
    ) -> InteractionData:
        """Build from parallel arrays of user ids, item ids and split names.

        ``n_users``/``n_items`` default to the largest id + 1 (ids are re-indexed from 0).
        """
        users = np.asarray(users, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        splits = np.asarray(splits).astype(str)
        if not len(users) == len(items) == len(splits):
            raise ValueError(
                f"users, items, splits differ in length: {len(users)}, {len(items)}, {len(splits)}"
            )
        if len(users) and (users.min() < 0 or items.min() < 0):
            raise ValueError("user and item ids must be non-negative")
        bad = sorted(set(np.unique(splits).tolist()) - set(SPLITS))
        if bad:
            raise ValueError(f"split has values {bad}; allowed: {list(SPLITS)}")
        n_users = int(users.max()) + 1 if n_users is None else n_users
        n_items = int(items.max()) + 1 if n_items is None else n_items
        if len(users) and (users.max() >= n_users or items.max() >= n_items):
            raise ValueError(f"ids exceed n_users={n_users} / n_items={n_items}")
        mats = {
            s: _binary_csr(users[splits == s], items[splits == s], (n_users, n_items))
            for s in SPLITS
        }
        if mats["train"].nnz == 0:
            raise ValueError("no train interactions: nothing to learn from")
        return cls(n_users=n_users, n_items=n_items, **mats)

    @classmethod
    def from_table(cls, table: pa.Table) -> InteractionData:
        """Build from a table that follows the INTERACTIONS contract (checked: types, dense ids,
        every split present)."""
        table = validate(table, INTERACTIONS, "interactions")
        table = check_content(table, INTERACTIONS, "interactions")
        return cls._from_checked(table)

    @classmethod
    def _from_checked(cls, table: pa.Table) -> InteractionData:
        """Build from a table already checked against the contract."""
        return cls.from_arrays(
            table.column("user_id").to_numpy(),
            table.column("item_id").to_numpy(),
            table.column("split").to_numpy(zero_copy_only=False),
        )


def load_interactions(path: str | Path) -> InteractionData:
    """Read ``interactions.parquet`` into InteractionData; the contract is checked before any
    matrix is sized by the ids, and errors name the file."""
    data = InteractionData._from_checked(read_table(path, INTERACTIONS, "interactions"))
    log.info(
        "interactions %s: %d users, %d items, %d train / %d valid / %d test",
        path,
        data.n_users,
        data.n_items,
        data.n_train,
        data.valid.nnz,
        data.test.nnz,
    )
    return data
