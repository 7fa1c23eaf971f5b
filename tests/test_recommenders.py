"""Recommenders, their registry and configs, the shared losses, sampling and data loading."""

import math
from functools import partial

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from graphs import clustered as make_clustered

from pipeline.data.interactions import InteractionData, load_interactions
from pipeline.data.schemas import INTERACTIONS, write_table
from pipeline.recommenders import (
    ItemFeatures,
    Recommender,
    get_recommender,
    list_recommenders,
    register_recommender,
)
from pipeline.recommenders.losses import bpr_loss, l2_reg
from pipeline.recommenders.vbpr import VBPR, VBPRConfig
from pipeline.training.sampling import epoch_batches, sample_negatives

clustered = partial(make_clustered, n_users=60, n_items=48, per_user=8, n_groups=4)


def group_features(data: InteractionData, n_groups=4, dim_text=3) -> ItemFeatures:
    gen = torch.Generator().manual_seed(0)
    image = F.one_hot(torch.arange(data.n_items) % n_groups, n_groups).float()
    text = torch.randn(data.n_items, dim_text, generator=gen)
    return ItemFeatures(image=image, text=text)


def test_registry_lists_models_and_rejects_unknown_names():
    assert {"bpr", "vbpr"} <= set(list_recommenders())
    assert get_recommender("vbpr") is VBPR
    with pytest.raises(ValueError, match=r"unknown recommender 'vbrp'; known: \[.*'bpr'.*'vbpr'"):
        get_recommender("vbrp")
    with pytest.raises(ValueError, match="already registered"):
        register_recommender("bpr")(VBPR)


def test_unknown_or_badly_typed_config_keys_raise():
    data = clustered()
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['emb_size'\]; allowed: "):
        get_recommender("bpr").build(data, None, {"emb_size": 8})
    with pytest.raises(ValueError, match="embedding_size = 8.5 should be int"):
        get_recommender("bpr").build(data, None, {"embedding_size": 8.5})
    with pytest.raises(ValueError, match="reg_weight = -1.0"):
        get_recommender("vbpr").build(data, group_features(data), {"reg_weight": -1})
    model = get_recommender("vbpr").build(data, group_features(data), VBPRConfig(16, 0.1))
    assert model.config == VBPRConfig(embedding_size=16, reg_weight=0.1)


def test_feature_models_need_features_and_id_models_ignore_them():
    data = clustered()
    with pytest.raises(ValueError, match="vbpr uses item features, but none were given"):
        get_recommender("vbpr").build(data, None, {})
    short = ItemFeatures(image=torch.zeros(data.n_items - 1, 2))
    with pytest.raises(ValueError, match="features have 47 rows, the interactions 48 items"):
        get_recommender("vbpr").build(data, short, {})
    assert get_recommender("bpr").build(data, group_features(data)).n_items == data.n_items
    with pytest.raises(ValueError, match="at least one of image, text"):
        ItemFeatures()
    with pytest.raises(ValueError, match="disagree"):
        ItemFeatures(image=torch.zeros(3, 2), text=torch.zeros(4, 2))


@pytest.mark.parametrize("name", list_recommenders())
def test_every_registered_model_scores_and_trains(name):
    """Smoke test for each registry entry: shapes, a finite scalar loss, learning."""
    torch.manual_seed(0)
    data = clustered()
    cls = get_recommender(name)
    model = cls.build(data, group_features(data), {"embedding_size": 8})
    assert isinstance(model, Recommender)
    users = torch.tensor([0, 5, 7])
    assert model.score(users).shape == (3, data.n_items)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for epoch in range(15):
        total = 0.0
        for u, p, n in epoch_batches(data, 64, seed=1, epoch=epoch):
            loss = model.loss(u, p, n)
            assert loss.ndim == 0 and torch.isfinite(loss)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
        losses.append(total)
    assert losses[-1] < losses[0]
    # learning, whatever the loss's floor (SLMRec's InfoNCE main loss has a high one): most of
    # each user's top 5 lie in the user's own group, where chance is 1 in 4
    model.eval()
    with torch.no_grad():
        top = model.score(torch.arange(data.n_users)).topk(5).indices
    in_group = (top % 4 == (torch.arange(data.n_users) % 4)[:, None]).float().mean().item()
    assert in_group > 0.6, f"{name}: only {in_group:.2f} of top-5 items in the user's group"


def test_vbpr_follows_mmrec_layout():
    data = clustered()
    feats = group_features(data)
    model = VBPR.build(data, feats, {"embedding_size": 8})
    assert model.user_embedding.shape == (data.n_users, 16)  # twice the item ID width
    assert model.item_features.shape == (data.n_items, 3 + 4)  # text first, then image
    assert torch.equal(model.item_features[:, :3], feats.text)
    assert model.item_representation().shape == (data.n_items, 16)
    reps = model.item_representation(torch.tensor([2, 9]))
    assert torch.allclose(reps, model.item_representation()[[2, 9]])
    assert "item_features" not in model.state_dict()  # features come from the store
    image_only = VBPR.build(data, ItemFeatures(image=feats.image), {"embedding_size": 8})
    assert image_only.item_linear.in_features == 4


def test_bpr_loss_and_l2_reg_values():
    pos, neg = torch.tensor([2.0, -1.0]), torch.tensor([0.0, 1.0])
    expected = -(
        math.log(torch.sigmoid(torch.tensor(2.0))) + math.log(torch.sigmoid(torch.tensor(-2.0)))
    )
    assert bpr_loss(pos, neg).item() == pytest.approx(expected / 2)
    assert torch.isfinite(bpr_loss(torch.tensor([-200.0]), torch.tensor([200.0])))
    a, b = torch.ones(4, 3), torch.full((4, 3), 2.0)
    # MMRec EmbLoss: (||a||_F + ||b||_F) / batch
    assert l2_reg(a, b).item() == pytest.approx((math.sqrt(12) + math.sqrt(48)) / 4)
    assert l2_reg(a, b, squared=True).item() == pytest.approx((12 + 48) / 2 / 4)


def test_bpr_closed_form_gradients_equal_autograd_through_the_embeddings():
    # repeated users and items (one item both a positive and a negative), a loss weighted as
    # a micro-batch's share, and negatives that are all an all-zero row (a zero norm, whose
    # gradient autograd takes as 0)
    data = clustered()
    model = get_recommender("bpr").build(data, None, {"embedding_size": 8, "reg_weight": 0.3})
    with torch.no_grad():
        model.item_embedding.weight[5] = 0
    tables = [model.user_embedding.weight, model.item_embedding.weight]
    users, pos = torch.tensor([0, 3, 3, 7, 0]), torch.tensor([1, 2, 2, 4, 9])
    for neg in (torch.tensor([4, 9, 1, 1, 2]), torch.tensor([5, 5, 5, 5, 5])):
        loss = model.loss(users, pos, neg) * 0.4
        loss.backward()
        got = [t.grad for t in tables]
        for t in tables:
            t.grad = None
        u, p, n = model.user_embedding(users), model.item_embedding(pos), model.item_embedding(neg)
        want = bpr_loss((u * p).sum(dim=1), (u * n).sum(dim=1)) + 0.3 * l2_reg(u, p, n)
        (want * 0.4).backward()
        assert loss.item() == pytest.approx(want.item() * 0.4, rel=1e-6)
        for g, t in zip(got, tables, strict=True):
            assert torch.isfinite(g).all()
            torch.testing.assert_close(g, t.grad, rtol=1e-6, atol=1e-7)
            t.grad = None
        assert got[1][2].abs().sum() > 0 and not got[0][1].any()  # a touched row, an untouched


def test_negatives_avoid_train_items_and_are_seeded():
    data = clustered()
    users = np.repeat(np.arange(data.n_users), 50)
    neg = sample_negatives(data, users, np.random.default_rng(0))
    train = data.train.toarray().astype(bool)
    assert not train[users, neg].any()
    assert np.array_equal(neg, sample_negatives(data, users, np.random.default_rng(0)))
    batches = list(epoch_batches(data, 100, seed=3, epoch=1))
    again = list(epoch_batches(data, 100, seed=3, epoch=1))
    other = list(epoch_batches(data, 100, seed=3, epoch=2))
    assert all(
        torch.equal(x, y)
        for b, c in zip(batches, again, strict=True)
        for x, y in zip(b, c, strict=True)
    )
    assert not torch.equal(batches[0][0], other[0][0])
    assert sum(len(b[0]) for b in batches) == data.n_train
    covered = sorted(
        zip(
            torch.cat([b[0] for b in batches]).tolist(),
            torch.cat([b[1] for b in batches]).tolist(),
            strict=True,
        )
    )
    assert covered == sorted(zip(data.train_users.tolist(), data.train_items.tolist(), strict=True))


def test_user_with_every_item_cannot_get_a_negative():
    data = InteractionData.from_arrays([0, 0, 1], [0, 1, 0], ["train"] * 3)
    with pytest.raises(ValueError, match="user 0 has interacted with all 2 train items"):
        sample_negatives(data, np.array([1, 0]), np.random.default_rng(0))


def test_load_interactions_from_contract(tmp_path):
    table = pa.table(
        {
            "user_id": pa.array([0, 0, 0, 1, 1, 1, 1], pa.int32()),
            "item_id": pa.array([0, 2, 1, 1, 2, 2, 0], pa.int32()),
            "rating": pa.array([5.0] * 7, pa.float32()),
            "timestamp": pa.array(range(7), pa.int64()),
            "split": ["train", "valid", "test", "train", "train", "train", "test"],
        }
    )
    write_table(table, tmp_path / "interactions.parquet", INTERACTIONS, "interactions")
    data = load_interactions(tmp_path / "interactions.parquet")
    assert (data.n_users, data.n_items, data.n_train) == (2, 3, 3)  # duplicate (1, 2) collapses
    assert data.train_users.tolist() == [0, 1, 1]
    assert data.train_items.tolist() == [0, 1, 2]
    assert data.items_of("test", 1).tolist() == [0]
    assert data.eval_users("valid").tolist() == [0]
    assert data.train_item_counts().tolist() == [1, 1, 1]
    dense = data.train_tensor().to_dense()
    assert dense.tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]
    with pytest.raises(ValueError, match="split has values \\['dev'\\]"):
        InteractionData.from_arrays([0], [0], ["dev"])


def test_item_features_from_unordered_rows():
    image = np.array([[2.0], [0.0], [1.0]])
    feats = ItemFeatures.from_arrays(np.array([2, 0, 1]), image, None, n_items=3)
    assert feats.image.flatten().tolist() == [0.0, 1.0, 2.0]
    assert feats.text is None and feats.image.dtype == torch.float32
    with pytest.raises(ValueError, match="first missing: \\[1\\]"):
        ItemFeatures.from_arrays(np.array([2, 0]), image[:2], None, n_items=3)
