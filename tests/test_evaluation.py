"""Evaluator: MMRec's metric definitions on hand-computed cases, masking, ties, baselines."""

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.data.interactions import InteractionData
from pipeline.training.baselines import evaluate_baseline, most_popular_scorer, random_scorer
from pipeline.training.evaluation import (
    EvalResult,
    check_topk,
    evaluate,
    metric_names,
    metrics_from_hits,
    recommend,
    top_k,
)

L3 = 1 / math.log2(3)  # discount at rank 2
L4 = 1 / math.log2(4)  # discount at rank 3


def fixed_scores(table: list[list[float]]):
    """A score_fn that looks the users' rows up in a fixed matrix."""
    scores = torch.tensor(table, dtype=torch.float32)
    return lambda users: scores[users]


def data_of(rows: list[tuple[int, int, str]], n_users: int, n_items: int) -> InteractionData:
    users, items, splits = zip(*rows, strict=True)
    return InteractionData.from_arrays(users, items, splits, n_users, n_items)


def test_single_relevant_item_hit_at_rank_two():
    out = metrics_from_hits(np.array([[0, 1, 0]]), np.array([1]), (1, 2, 3))
    expected = {
        "recall@1": 0.0,
        "recall@2": 1.0,
        "recall@3": 1.0,
        "ndcg@1": 0.0,
        "ndcg@2": L3,
        "ndcg@3": L3,
        "precision@1": 0.0,
        "precision@2": 0.5,
        "precision@3": 1 / 3,
        "map@1": 0.0,
        "map@2": 0.5,
        "map@3": 0.5,
    }
    assert list(out) == metric_names((1, 2, 3))
    assert {k: float(v[0]) for k, v in out.items()} == pytest.approx(expected)


def test_recall_divides_by_all_relevant_items_not_min_k():
    # 4 relevant items, hits at ranks 1 and 3: MMRec's recall is hits / 4 even at K = 1
    out = metrics_from_hits(np.array([[1, 0, 1]]), np.array([4]), (1, 2, 3))
    got = {k: float(v[0]) for k, v in out.items()}
    assert got["recall@1"] == pytest.approx(0.25)
    assert got["recall@3"] == pytest.approx(0.5)
    assert got["precision@3"] == pytest.approx(2 / 3)
    # ideal DCG uses min(4, K) relevant items at the top
    assert got["ndcg@1"] == pytest.approx(1.0)
    assert got["ndcg@2"] == pytest.approx(1 / (1 + L3))
    assert got["ndcg@3"] == pytest.approx((1 + L4) / (1 + L3 + L4))
    # AP: sum of precision at the hits over min(4, K)
    assert got["map@1"] == pytest.approx(1.0)
    assert got["map@2"] == pytest.approx(0.5)
    assert got["map@3"] == pytest.approx((1 + 2 / 3) / 3)


def test_top_k_breaks_ties_by_lower_item_id():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    assert top_k(scores, 2).tolist() == [[1, 2], [0, 1]]
    assert top_k(scores, 4).tolist() == [[1, 2, 4, 3], [0, 1, 2, 3]]
    assert top_k(scores, 5).tolist() == [[1, 2, 4, 3, 0], [0, 1, 2, 3, 4]]  # k = n_items
    with pytest.raises(ValueError, match="NaN"):
        top_k(torch.tensor([[0.0, float("nan")]]), 1)


def test_evaluate_ties_mask_and_skipped_users():
    # 3 users x 6 items; item scores tie at 1.0 for items 1, 2, 3
    data = data_of(
        [
            (0, 0, "train"),
            (0, 3, "test"),  # user 0: test item 3, tied with 1 and 2 -> rank 3
            (1, 0, "train"),
            (1, 1, "train"),
            (1, 2, "train"),
            (1, 3, "train"),
            (1, 4, "train"),
            (1, 5, "test"),  # user 1: all but item 5 masked, 5 scores lowest
            (2, 1, "train"),
            (2, 2, "valid"),  # user 2: no test item -> skipped on test
        ],
        n_users=3,
        n_items=6,
    )
    row = [5.0, 1.0, 1.0, 1.0, 0.0, -1.0]
    result = evaluate(fixed_scores([row, row, row]), data, "test", topk=(1, 2, 3))
    assert result.users.tolist() == [0, 1]
    got = {k: v.tolist() for k, v in result.per_user.items()}
    assert got["recall@1"] == [0.0, 1.0]
    assert got["recall@2"] == [0.0, 1.0]
    assert got["recall@3"] == [1.0, 1.0]
    assert got["ndcg@3"] == pytest.approx([L4, 1.0])
    assert got["precision@3"] == pytest.approx([1 / 3, 1 / 3])
    assert got["map@3"] == pytest.approx([1 / 3, 1.0])
    assert result.means["recall@1"] == pytest.approx(0.5)
    # the ranked lists: train items never ahead of an unmasked item
    ranked = recommend(fixed_scores([row, row, row]), data, np.array([0, 1]), 3)
    assert ranked.tolist() == [[1, 2, 3], [5, 0, 1]]


def test_seen_train_items_never_recommended():
    rng = np.random.default_rng(0)
    n_users, n_items = 30, 40
    rows = [(u, int(i), "train") for u in range(n_users) for i in rng.choice(n_items, 8, False)]
    rows += [(u, (u * 7) % n_items, "test") for u in range(n_users)]
    rows = list(dict.fromkeys(rows))
    data = data_of(rows, n_users, n_items)
    # train items get the highest scores: masking must push them out of the top-k
    boost = torch.from_numpy(data.train.toarray()) * 100 + torch.rand(n_users, n_items)
    ranked = recommend(lambda users: boost[users], data, np.arange(n_users), 20, batch_size=7)
    for u in range(n_users):
        assert not set(ranked[u]) & set(data.items_of("train", u))


def test_test_evaluation_does_not_mask_validation_items():
    # MMRec masks only train items, also at test time: a top-scored valid item keeps rank 1
    data = data_of([(0, 0, "train"), (0, 1, "valid"), (0, 2, "test")], 1, 4)
    result = evaluate(fixed_scores([[0.0, 3.0, 2.0, 1.0]]), data, "test", topk=(1, 2))
    assert result.per_user["recall@1"].tolist() == [0.0]
    assert result.per_user["recall@2"].tolist() == [1.0]


def test_evaluate_checks_inputs():
    data = data_of([(0, 0, "train"), (0, 1, "test")], 1, 3)
    with pytest.raises(ValueError, match="exceeds the number of items"):
        evaluate(fixed_scores([[0.0, 1.0, 2.0]]), data, "test", topk=(2, 5))
    with pytest.raises(ValueError, match="allowed: \\['valid', 'test'\\]"):
        evaluate(fixed_scores([[0.0, 1.0, 2.0]]), data, "train", topk=(1,))
    with pytest.raises(ValueError, match="no user has an item in split 'valid'"):
        evaluate(fixed_scores([[0.0, 1.0, 2.0]]), data, "valid", topk=(1,))
    with pytest.raises(ValueError, match="score_fn returned"):
        evaluate(lambda users: torch.zeros(len(users), 2), data, "test", topk=(1,))
    with pytest.raises(ValueError, match="distinct positive"):
        check_topk((10, 10))


def test_per_user_table_round_trips(tmp_path):
    result = EvalResult(
        "test", np.array([3, 5]), {"recall@1": np.array([0.5, 1.0]), "ndcg@1": np.zeros(2)}
    )
    result.write_parquet(tmp_path / "per_user.parquet")
    table = pq.read_table(tmp_path / "per_user.parquet")
    assert str(table.schema.field("user_id").type) == "int32"
    assert str(table.schema.field("recall@1").type) == "double"
    assert table.column("user_id").to_pylist() == [3, 5]
    assert result.means == {"recall@1": 0.75, "ndcg@1": 0.0}


def test_most_popular_baseline():
    # item popularity in train: item 2 (3 users) > item 1 (2 users) > item 0 (1 user)
    data = data_of(
        [
            (0, 2, "train"),
            (1, 2, "train"),
            (2, 2, "train"),
            (0, 1, "train"),
            (1, 1, "train"),
            (3, 0, "train"),
            (3, 1, "test"),  # user 3: popular items 2, 1 -> test item at rank 2
            (2, 3, "test"),  # user 2: item 2 masked; order 1, 0, 3, 4 -> rank 3
        ],
        n_users=4,
        n_items=5,
    )
    scores = most_popular_scorer(data)(torch.tensor([0]))
    assert scores.tolist() == [[1.0, 2.0, 3.0, 0.0, 0.0]]
    result = evaluate_baseline("most_popular", data, "test", topk=(1, 2, 3))
    assert result.users.tolist() == [2, 3]
    assert result.per_user["recall@2"].tolist() == [0.0, 1.0]
    assert result.per_user["recall@3"].tolist() == [1.0, 1.0]
    assert result.per_user["ndcg@3"].tolist() == pytest.approx([L4, L3])
    with pytest.raises(ValueError, match="known: \\['most_popular', 'random'\\]"):
        evaluate_baseline("oracle", data)


def test_random_baseline_is_fixed_per_user_and_seed():
    data = data_of([(u, u % 9, "train") for u in range(12)] + [(0, 3, "test")], 12, 9)
    score = random_scorer(data, seed=1)
    all_users = score(torch.arange(12))
    assert torch.equal(score(torch.tensor([5, 7])), all_users[[5, 7]])
    assert ((all_users >= 0) & (all_users < 1)).all()
    assert not torch.equal(random_scorer(data, seed=2)(torch.arange(12)), all_users)
    assert not torch.equal(all_users[0], all_users[1])


@pytest.mark.parametrize("k", [1, 5, 12])
def test_top_k_matches_a_full_sort_on_heavily_tied_scores(k):
    gen = torch.Generator().manual_seed(k)
    scores = torch.randint(0, 4, (300, 12), generator=gen).float()  # ties everywhere
    scores[::7] = torch.randn(len(scores[::7]), 12, generator=gen)  # and rows with none
    expected = [np.lexsort((np.arange(12), -row))[:k] for row in scores.numpy()]
    assert top_k(scores, k).numpy().tolist() == np.array(expected).tolist()
