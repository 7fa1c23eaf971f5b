"""Non-learned reference rankings, scored by the same evaluator as the recommenders."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from pipeline.data.interactions import InteractionData
from pipeline.training.evaluation import EvalResult, ScoreFn, evaluate


def most_popular_scorer(data: InteractionData) -> ScoreFn:
    """Every user gets the items ranked by their number of train users."""
    popularity = torch.from_numpy(data.train_item_counts()).to(torch.float32)  # [n_items]
    return lambda users: popularity.expand(len(users), -1)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 arrays (wrapping arithmetic): a fast integer hash."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def random_scorer(data: InteractionData, seed: int) -> ScoreFn:
    """Uniform random scores in [0, 1), a hash of (seed, user, item): the same user gets the
    same ranking whatever the batch it is scored in."""
    items = np.arange(data.n_items, dtype=np.uint64)
    offset = _splitmix64(np.array([seed], dtype=np.uint64))

    def score(users: torch.Tensor) -> torch.Tensor:
        keys = users.numpy().astype(np.uint64)[:, None] * np.uint64(data.n_items) + items
        bits = _splitmix64(keys + offset) >> np.uint64(11)  # 53 random bits
        return torch.from_numpy(bits.astype(np.float64) * 2.0**-53)

    return score


BASELINES: dict[str, Callable[[InteractionData, int], ScoreFn]] = {
    "most_popular": lambda data, seed: most_popular_scorer(data),
    "random": random_scorer,
}


def evaluate_baseline(
    name: str,
    data: InteractionData,
    split: str = "test",
    topk: Sequence[int] = (10, 20, 50),
    seed: int = 2022,
) -> EvalResult:
    """Evaluate the baseline ``name`` (most_popular | random) on ``split``."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; known: {sorted(BASELINES)}")
    return evaluate(BASELINES[name](data, seed), data, split, topk)
