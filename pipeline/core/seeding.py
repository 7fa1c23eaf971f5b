"""One place that fixes every random generator lmmrec uses."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so that the same params give the same results on CPU."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
