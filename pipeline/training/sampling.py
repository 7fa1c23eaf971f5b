"""Seeded, vectorised (user, positive, negative) triples for one epoch of BPR training."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from pipeline.data.interactions import InteractionData

MAX_ROUNDS = 1000  # rejection rounds before giving up (each round redraws only the rejected)


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator of one epoch: depends only on (seed, epoch), not on earlier epochs."""
    return np.random.default_rng([seed, epoch])


def sample_negatives(
    data: InteractionData, users: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """One negative item per entry of ``users``: uniform over the items seen in train,
    rejecting the user's own train items (as MMRec's TrainDataLoader does).

    Vectorised rejection sampling: every round redraws, at once, only the rejected entries.
    """
    users = np.asarray(users, dtype=np.int64)
    pool = np.flatnonzero(data.train_item_counts())  # the items with a train interaction
    degree = np.diff(data.train.indptr)[users]
    if len(users) and degree.max() >= len(pool):
        full = users[degree >= len(pool)][0]
        raise ValueError(
            f"user {full} has interacted with all {len(pool)} train items: no negative to sample"
        )
    # train pairs as sorted keys user * n_items + item (CSR rows are sorted by user, then item)
    keys = data.train_users * data.n_items + data.train_items
    neg = pool[rng.integers(0, len(pool), size=len(users))]
    todo = np.arange(len(users))
    for _ in range(MAX_ROUNDS):
        query = users[todo] * data.n_items + neg[todo]
        pos = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
        todo = todo[keys[pos] == query]
        if len(todo) == 0:
            return neg
        neg[todo] = pool[rng.integers(0, len(pool), size=len(todo))]
    raise RuntimeError(f"negative sampling did not finish in {MAX_ROUNDS} rounds")


def epoch_batches(
    data: InteractionData, batch_size: int, seed: int, epoch: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Shuffled (users, pos, neg) LongTensor batches covering every train pair once.

    One negative per positive, drawn for the whole epoch up front; the same (seed, epoch)
    gives the same batches.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size = {batch_size}; use at least 1")
    rng = epoch_rng(seed, epoch)
    order = rng.permutation(data.n_train)
    users = data.train_users[order]
    pos = data.train_items[order]
    neg = sample_negatives(data, users, rng)
    triples = torch.from_numpy(np.stack([users, pos, neg]))
    for start in range(0, data.n_train, batch_size):
        batch = triples[:, start : start + batch_size]
        yield batch[0], batch[1], batch[2]
