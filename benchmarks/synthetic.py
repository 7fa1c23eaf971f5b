"""Seeded synthetic data the size of the LMM4Rec datasets, shared by the benchmark scripts
(run from this folder, so importable as-is): 5-core-like interactions and random features."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.data.interactions import InteractionData
from pipeline.recommenders.base import ItemFeatures

IMAGE_DIM, TEXT_DIM = 4096, 384  # the VGG image features of Amazon 2014 + a MiniLM text vector
POPULARITY_EXPONENT = 0.6  # item i of popularity rank r is drawn with weight r ** -0.6
USER_DEGREE_SHAPE = 1.5  # Pareto shape of the per-user extra interactions above 5
SPLITS = np.array(["train", "valid", "test"])


@dataclass(frozen=True)
class Size:
    """A dataset's shape: users, items and interactions (all splits) after 5-core filtering."""

    name: str
    users: int
    items: int
    interactions: int


BABY = Size("baby", 19_445, 7_050, 160_792)  # Amazon 2014 Baby, 5-core
SPORTS = Size("sports", 35_598, 18_357, 296_337)  # Amazon 2014 Sports_and_Outdoors, 5-core
CLOTHING = Size("clothing", 39_387, 23_033, 278_677)  # Amazon 2014 Clothing_Shoes_and_Jewelry
ELEC = Size("elec", 192_403, 63_001, 1_689_188)  # Amazon 2014 Electronics, 5-core (the largest)
SIZES = {s.name: s for s in (BABY, SPORTS, CLOTHING, ELEC)}


def synthetic_arrays(size: Size, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users, items, split codes 0/1/2 = train/valid/test) of ``size``: every user >= 5 items
    (heavy-tailed degrees), items drawn by power-law popularity without repeats per user,
    per-user 8:1:1 split. Seeded."""
    rng = np.random.default_rng(seed)
    n_users, n_items = size.users, size.items
    extra = size.interactions - 5 * n_users
    weights = rng.pareto(USER_DEGREE_SHAPE, n_users) + 1.0
    degree = 5 + rng.multinomial(extra, weights / weights.sum())
    users = np.repeat(np.arange(n_users), degree)
    popularity = np.arange(1, n_items + 1, dtype=np.float64) ** -POPULARITY_EXPONENT
    popularity = popularity[rng.permutation(n_items)]  # popularity unrelated to item id
    popularity /= popularity.sum()
    items = rng.choice(n_items, size=len(users), p=popularity)
    while True:  # redraw repeated (user, item) pairs until none is left
        keys = users * n_items + items
        order = np.argsort(keys, kind="stable")
        repeated = np.zeros(len(keys), dtype=bool)
        repeated[order[1:]] = keys[order[1:]] == keys[order[:-1]]
        if not repeated.any():
            break
        items[repeated] = rng.choice(n_items, size=int(repeated.sum()), p=popularity)
    position = np.arange(len(users)) - np.repeat(np.cumsum(degree) - degree, degree)
    n_held = np.repeat(np.maximum(1, np.rint(0.1 * degree).astype(np.int64)), degree)
    split = np.where(position < n_held, 2, np.where(position < 2 * n_held, 1, 0)).astype(np.uint8)
    return users, items, split


def synthetic_interactions(size: Size, seed: int) -> InteractionData:
    """The interactions of ``synthetic_arrays`` as InteractionData."""
    users, items, split = synthetic_arrays(size, seed)
    return InteractionData.from_arrays(users, items, SPLITS[split], size.users, size.items)


def synthetic_feature_arrays(n_items: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random float32 item features: image [n_items, 4096] and text [n_items, 384]."""
    rng = np.random.default_rng([seed, 1])
    image = rng.standard_normal((n_items, IMAGE_DIM), dtype=np.float32)
    text = rng.standard_normal((n_items, TEXT_DIM), dtype=np.float32)
    return image, text


def synthetic_features(n_items: int, seed: int) -> ItemFeatures:
    """``synthetic_feature_arrays`` as ItemFeatures."""
    image, text = synthetic_feature_arrays(n_items, seed)
    return ItemFeatures(image=torch.from_numpy(image), text=torch.from_numpy(text))
