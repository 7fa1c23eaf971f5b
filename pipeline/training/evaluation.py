"""Full-ranking top-K evaluation with per-user results, following MMRec's protocol.

What MMRec does (``src/utils/quick_start.py``, ``dataloader.py`` EvalDataLoader,
``common/trainer.py`` evaluate, ``utils/topk_evaluator.py``, ``utils/metrics.py``), and so
what this module does:

- Every item is scored for each evaluated user; the user's TRAIN items are masked (MMRec
  builds both the valid and the test EvalDataLoader with ``additional_dataset=train``, so at
  test time the validation items are NOT masked). MMRec writes -1e10 into masked scores; we
  write -inf. Users with no item in the evaluated split are skipped.
- Metrics per user at K, from the hit vector h_1..h_K of the top-K list and m = the number
  of the user's items in the split:
    recall@K    = sum_{i<=K} h_i / m            (MMRec ``recall_``: divides by m, not min(m, K))
    precision@K = sum_{i<=K} h_i / K
    ndcg@K      = sum_{i<=K} h_i / log2(i + 1)  /  sum_{i<=min(m, K)} 1 / log2(i + 1)
    map@K       = sum_{i<=K} h_i * P@i  /  min(m, K)   (P@i = precision at i)
  and the reported value is the mean over users. We keep the per-user values (MMRec only
  keeps the means, rounded to 4 places; we do not round).
- Ties: MMRec takes torch.topk's order, which is unspecified for equal scores. Here equal
  scores are ranked by lower item id, so results do not depend on the device or the kernel.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
import torch
from tqdm import tqdm

from pipeline.core.atomic import atomic_path
from pipeline.data.interactions import InteractionData

log = logging.getLogger(__name__)

METRICS = ("recall", "ndcg", "precision", "map")
ScoreFn = Callable[[torch.Tensor], torch.Tensor]  # user ids [B] (cpu, int64) -> [B, n_items]


def metric_names(topk: Sequence[int]) -> list[str]:
    """Column names, metric-major: recall@10, recall@20, ..., map@50."""
    return [f"{m}@{k}" for m in METRICS for k in topk]


def check_topk(topk: Sequence[int], n_items: int | None = None) -> tuple[int, ...]:
    """Validate cut-offs (positive, distinct, at most n_items); return them sorted."""
    ks = tuple(sorted(int(k) for k in topk))
    if not ks or ks[0] < 1 or len(set(ks)) != len(ks):
        raise ValueError(f"topk = {list(topk)}; use distinct positive integers")
    if n_items is not None and ks[-1] > n_items:
        raise ValueError(f"topk = {list(topk)} exceeds the number of items ({n_items})")
    return ks


def _top_k_set_by_id(scores: torch.Tensor, threshold: torch.Tensor, k: int) -> torch.Tensor:
    """The k best items per row when ties at ``threshold`` (the k-th value) cross the cut:
    every score > threshold, then the lowest ids among the scores == threshold. [B, k]."""
    above = scores > threshold
    at = scores == threshold
    need = k - above.sum(dim=1, keepdim=True)
    chosen = above | (at & (at.cumsum(dim=1, dtype=torch.int32) <= need))  # exactly k per row
    return chosen.nonzero()[:, 1].view(scores.shape[0], k)


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores per row, [B, k], best first; ties -> lower index first.

    torch.topk picks k + 1 candidates, best first; rows whose k-th and (k+1)-th scores are
    equal (ties straddle the cut) are redone exactly (lowest ids win), and only rows with a tie
    among their k winners are reordered by (score desc, id asc): most rows need neither.
    """
    extra = int(k < scores.shape[1])  # one more place shows whether ties cross the cut
    values, index = torch.topk(scores, k + extra, dim=1)
    if torch.isnan(values[:, 0]).any():  # topk ranks NaN above every number
        raise ValueError("scores contain NaN: cannot rank")
    index = index[:, :k]
    redo = (values[:, 1:k] == values[:, : k - 1]).any(dim=1)  # a tie inside the top k
    if extra:
        straddle = values[:, k] == values[:, k - 1]
        if straddle.any():
            rows = straddle.nonzero()[:, 0]
            index[rows] = _top_k_set_by_id(scores[rows], values[rows, k - 1 : k], k)
            redo |= straddle
    if redo.any():
        rows = redo.nonzero()[:, 0]
        ids = index[rows].sort(dim=1).values  # ids ascending, so the stable sort breaks ties
        order = scores[rows].gather(1, ids).sort(dim=1, descending=True, stable=True).indices
        index[rows] = ids.gather(1, order)
    return index


def metrics_from_hits(hits: np.ndarray, n_relevant: np.ndarray, topk: Sequence[int]) -> dict:
    """Per-user metrics from a hit matrix [U, max(topk)] and relevant counts [U] (>= 1)."""
    hits = hits.astype(np.float64)
    n_relevant = n_relevant.astype(np.float64)
    ranks = np.arange(1, hits.shape[1] + 1, dtype=np.float64)
    discount = 1.0 / np.log2(ranks + 1.0)
    ideal = np.cumsum(discount)  # ideal DCG with j relevant items at the top: ideal[j - 1]
    cum_hits = np.cumsum(hits, axis=1)
    dcg = np.cumsum(hits * discount, axis=1)
    ap_sum = np.cumsum(hits * cum_hits / ranks, axis=1)
    out: dict[str, np.ndarray] = {}
    for k in topk:
        capped = np.minimum(n_relevant, k).astype(np.int64)
        out[f"recall@{k}"] = cum_hits[:, k - 1] / n_relevant
        out[f"ndcg@{k}"] = dcg[:, k - 1] / ideal[capped - 1]
        out[f"precision@{k}"] = cum_hits[:, k - 1] / k
        out[f"map@{k}"] = ap_sum[:, k - 1] / capped
    return {name: out[name] for name in metric_names(topk)}


@dataclass(frozen=True, eq=False)
class EvalResult:
    """Per-user metrics of one split: ``per_user[name]`` [U] float64 aligned with ``users``."""

    split: str
    users: np.ndarray  # [U] int64, the evaluated users, ascending
    per_user: dict[str, np.ndarray]

    @property
    def means(self) -> dict[str, float]:
        """Mean over users of each metric (the numbers MMRec reports)."""
        return {name: float(np.mean(values)) for name, values in self.per_user.items()}

    def to_table(self) -> pa.Table:
        """One row per user: user_id int32 + one float64 column per metric."""
        columns = {"user_id": pa.array(self.users.astype(np.int32), pa.int32())}
        columns.update({k: pa.array(v, pa.float64()) for k, v in self.per_user.items()})
        return pa.table(columns)

    def write_parquet(self, path: str | Path) -> None:
        """Write ``to_table()`` to ``path`` atomically."""
        with atomic_path(path) as tmp:
            pq.write_table(self.to_table(), tmp)


def _pairs(mat: sp.csr_matrix, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position in ``users``, item) of every entry in the CSR rows ``users``."""
    sub = mat[users]
    return np.repeat(np.arange(len(users)), np.diff(sub.indptr)), sub.indices.astype(np.int64)


@torch.no_grad()
def recommend(
    score_fn: ScoreFn,
    data: InteractionData,
    users: np.ndarray,
    k: int,
    batch_size: int = 4096,
) -> np.ndarray:
    """Top-``k`` items [U, k] for ``users``, best first, each user's train items masked (-inf).

    A user with fewer than k unmasked items gets masked items (lowest id first) at the end.
    """
    users = np.asarray(users, dtype=np.int64)
    ranked = np.empty((len(users), k), dtype=np.int64)
    starts = range(0, len(users), batch_size)
    for start in tqdm(starts, desc="rank", leave=False, disable=None):
        batch = users[start : start + batch_size]
        scores = score_fn(torch.from_numpy(batch))
        if scores.shape != (len(batch), data.n_items):
            raise ValueError(
                f"score_fn returned {tuple(scores.shape)}, expected {(len(batch), data.n_items)}"
            )
        scores = scores.to(torch.float32, copy=True)
        rows, items = (torch.from_numpy(a).to(scores.device) for a in _pairs(data.train, batch))
        scores[rows, items] = -torch.inf
        ranked[start : start + len(batch)] = top_k(scores, k).cpu().numpy()
    return ranked


def evaluate(
    score_fn: ScoreFn,
    data: InteractionData,
    split: str,
    topk: Sequence[int] = (10, 20, 50),
    batch_size: int = 4096,
) -> EvalResult:
    """Rank all items for every user with items in ``split`` (valid | test), train items
    masked, and compute per-user recall/ndcg/precision/map at each K in ``topk``."""
    ks = check_topk(topk, data.n_items)
    users = data.eval_users(split)
    if len(users) == 0:
        raise ValueError(f"no user has an item in split {split!r}: nothing to evaluate")
    ranked = recommend(score_fn, data, users, ks[-1], batch_size)  # [U, K]
    truth = data.split_matrix(split)
    rows, items = _pairs(truth, np.arange(data.n_users))
    truth_keys = rows * data.n_items + items  # sorted: rows ascending, items sorted per row
    query = users[:, None] * data.n_items + ranked
    found = np.minimum(np.searchsorted(truth_keys, query), len(truth_keys) - 1)
    hits = truth_keys[found] == query
    n_relevant = np.diff(truth.indptr)[users]
    return EvalResult(split=split, users=users, per_user=metrics_from_hits(hits, n_relevant, ks))
