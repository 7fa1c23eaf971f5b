"""LightGCN and MMGCN: propagation against dense references, modalities, learning, caching."""

from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from graphs import clustered as make_clustered

from pipeline.data.interactions import InteractionData
from pipeline.recommenders import ItemFeatures, get_recommender
from pipeline.recommenders.bpr import BPR
from pipeline.recommenders.lightgcn import LightGCN
from pipeline.recommenders.mmgcn import MMGCN, mean_adjacency
from pipeline.training.sampling import epoch_batches

N_GROUPS = 3


clustered = partial(make_clustered, n_users=30, n_items=24, per_user=6, n_groups=N_GROUPS)


def features(data: InteractionData, image=True, text=True) -> ItemFeatures:
    """Image features reveal the item's group; text features are noise (widths 5 and 3)."""
    gen = torch.Generator().manual_seed(0)
    group = F.one_hot(torch.arange(data.n_items) % N_GROUPS, 5).float()
    noise = torch.randn(data.n_items, 3, generator=gen)
    return ItemFeatures(image=group if image else None, text=noise if text else None)


def dense_graph(data: InteractionData) -> np.ndarray:
    """The symmetric user-item adjacency [(U + I), (U + I)] as a dense 0/1 matrix."""
    r = data.train.toarray()
    top = np.hstack([np.zeros((data.n_users, data.n_users)), r])
    bottom = np.hstack([r.T, np.zeros((data.n_items, data.n_items))])
    return np.vstack([top, bottom])


def fit(model, data, epochs=30, lr=0.02) -> list[float]:
    """Train with Adam; returns the summed loss of each epoch."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    history = []
    for epoch in range(epochs):
        model.train()
        total = 0.0
        for users, pos, neg in epoch_batches(data, 64, seed=0, epoch=epoch):
            loss = model.loss(users, pos, neg)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
        history.append(total)
    return history


def in_group_margin(model, data) -> float:
    """Mean over users of (score of own-group items - score of other items), in eval mode."""
    model.eval()
    scores = model.score(torch.arange(data.n_users))
    same = (torch.arange(data.n_users)[:, None] % N_GROUPS) == (
        torch.arange(data.n_items)[None, :] % N_GROUPS
    )
    return ((scores * same).sum(1) / same.sum(1) - (scores * ~same).sum(1) / (~same).sum(1)).mean()


def test_lightgcn_without_layers_is_matrix_factorisation():
    data = clustered()
    torch.manual_seed(0)
    model = LightGCN.build(data, None, {"embedding_size": 8, "n_layers": 0})
    mf = BPR.build(data, None, {"embedding_size": 8})
    with torch.no_grad():
        mf.user_embedding.weight.copy_(model.user_embedding)
        mf.item_embedding.weight.copy_(model.item_embedding)
    users, pos, neg = next(epoch_batches(data, 16, seed=0, epoch=0))
    assert torch.allclose(model.score(users), mf.score(users))
    assert torch.allclose(model.loss(users, pos, neg), mf.loss(users, pos, neg))


def test_lightgcn_one_layer_matches_dense_normalised_adjacency():
    data = clustered(n_users=7, n_items=12, per_user=4)
    torch.manual_seed(0)
    model = LightGCN.build(data, None, {"embedding_size": 4, "n_layers": 1})
    a = dense_graph(data)
    d = a.sum(1)
    inv = np.where(d > 0, 1 / np.sqrt(np.maximum(d, 1)), 0)
    a_hat = torch.tensor(inv[:, None] * a * inv[None, :], dtype=torch.float32)
    e0 = torch.cat([model.user_embedding, model.item_embedding]).detach()
    expected = (e0 + a_hat @ e0) / 2
    users, items = model.forward()
    assert torch.allclose(torch.cat([users, items]), expected, atol=1e-6)
    with pytest.raises(ValueError, match="n_layers = -1"):
        LightGCN.build(data, None, {"n_layers": -1})


def test_mmgcn_mean_adjacency_averages_neighbours():
    data = clustered(n_users=7, n_items=12, per_user=4)
    a = dense_graph(data)
    expected = a / np.maximum(a.sum(1, keepdims=True), 1)
    adjacency, transposed = mean_adjacency(data)
    assert np.allclose(adjacency.to_dense().numpy(), expected)
    assert np.allclose(transposed.to_dense().numpy(), expected.T)


@pytest.mark.parametrize(("image", "text"), [(True, False), (False, True), (True, True)])
def test_mmgcn_works_with_any_modalities(image, text):
    data = clustered()
    torch.manual_seed(0)
    config = {"embedding_size": 8, "image_latent_size": 6, "n_layers": 2}
    model = MMGCN.build(data, features(data, image, text), config)
    assert set(model.gcns) == {n for n, on in (("image", image), ("text", text)) if on}
    if image:  # image features are projected; text enters at its own width
        assert model.gcns["image"].preference.shape == (data.n_users, 6)
    if text:
        assert model.gcns["text"].preference.shape == (data.n_users, 3)
    out = model.forward()
    assert out.shape == (data.n_users + data.n_items, 8)
    graph = (model.adjacency, model.adjacency_t)
    reps = [
        gcn(getattr(model, f"{name}_features"), model.id_embedding, graph)
        for name, gcn in model.gcns.items()
    ]
    assert torch.allclose(out, sum(reps) / len(reps))  # the mean over modalities
    users, pos, neg = next(epoch_batches(data, 16, seed=0, epoch=0))
    model.loss(users, pos, neg).backward()
    assert model.id_embedding.grad.abs().sum() > 0
    assert all(gcn.preference.grad.abs().sum() > 0 for gcn in model.gcns.values())
    assert model.score(users).shape == (16, data.n_items)


def test_mmgcn_batch_rows_match_the_full_pass():
    data = clustered()
    torch.manual_seed(0)
    model = MMGCN.build(data, features(data), {"embedding_size": 8, "n_layers": 2})
    rows = torch.tensor([0, 3, data.n_users + 5, data.n_users + data.n_items - 1])
    assert torch.allclose(model.forward(rows), model.forward()[rows], atol=1e-6)
    users, pos, neg = next(epoch_batches(data, 16, seed=0, epoch=0))
    full = model.forward()  # the loss written on the full pass, as MMRec computes it
    u, p, n = full[users], full[pos + data.n_users], full[neg + data.n_users]
    ranking = F.softplus((u * n).sum(1) - (u * p).sum(1)).mean()
    ids = model.id_embedding
    reg = (ids[users].pow(2).mean() + ids[pos + data.n_users].pow(2).mean()) / 2
    reg = reg + (ids[users].pow(2).mean() + ids[neg + data.n_users].pow(2).mean()) / 2
    reg = reg + sum(g.preference.pow(2).mean() for g in model.gcns.values())
    expected = ranking + model.config.reg_weight * reg
    assert torch.allclose(model.loss(users, pos, neg), expected, atol=1e-6)


def test_mmgcn_additive_combination():
    data = clustered()
    torch.manual_seed(0)
    config = {"embedding_size": 8, "image_latent_size": 6, "n_layers": 2, "concat": False}
    model = MMGCN.build(data, features(data, text=False), config)
    gcn = model.gcns["image"]
    assert [c.weight.shape for c in gcn.combine] == [(8, 6), (8, 8)]  # Linear(h) alone
    x = F.normalize(torch.cat([gcn.preference, gcn.project(model.image_features)]))
    graph = torch.tensor(dense_graph(data), dtype=torch.float32)
    mean = graph / graph.sum(1, keepdim=True).clamp(min=1)
    for conv, linear, combine in zip(gcn.conv, gcn.linear, gcn.combine, strict=True):
        h = F.leaky_relu(mean @ x @ conv)
        x = F.leaky_relu(combine(h) + F.leaky_relu(linear(x)) + model.id_embedding)
    assert torch.allclose(model.forward(), x, atol=1e-5)


def test_mmgcn_can_freeze_embeddings_as_mmrec():
    data = clustered()
    torch.manual_seed(0)
    model = MMGCN.build(data, features(data), {"embedding_size": 8, "learn_embeddings": False})
    frozen = [model.id_embedding, *(g.preference for g in model.gcns.values())]
    before = [t.detach().clone() for t in frozen]
    conv_before = model.gcns["image"].conv[0].detach().clone()
    fit(model, data, epochs=2)
    assert all(torch.equal(a, b) for a, b in zip(before, frozen, strict=True))
    assert not torch.equal(conv_before, model.gcns["image"].conv[0])


@pytest.mark.parametrize(
    ("name", "config"),
    [
        ("lightgcn", {"embedding_size": 8, "n_layers": 2}),
        ("mmgcn", {"embedding_size": 8, "image_latent_size": 8, "n_layers": 2}),
        ("mmgcn", {"embedding_size": 8, "n_layers": 2, "concat": False}),
    ],
)
def test_graph_models_learn_the_clusters(name, config):
    data = clustered()
    torch.manual_seed(0)
    model = get_recommender(name).build(data, features(data), config)
    before = in_group_margin(model, data)
    history = fit(model, data)
    assert history[-1] < 0.6 * history[0]
    assert in_group_margin(model, data) > before + 0.5


@pytest.mark.parametrize("name", ["lightgcn", "mmgcn"])
def test_cached_scores_are_dropped_when_training_resumes(name):
    data = clustered()
    torch.manual_seed(0)
    model = get_recommender(name).build(data, features(data), {"embedding_size": 8})
    users = torch.arange(5)
    model.eval()
    first = model.score(users)
    table = model.item_embedding if name == "lightgcn" else model.id_embedding
    with torch.no_grad():
        table.add_(1.0)
    assert torch.equal(model.score(users), first)  # eval mode reuses the propagation
    model.train()
    fresh = model.score(users)  # train mode always propagates
    assert not torch.allclose(fresh, first)
    model.eval()
    assert torch.allclose(model.score(users), fresh)
