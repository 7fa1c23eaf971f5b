"""LATTICE: sparse kNN item graphs against MMRec's dense formulas, gradients, modalities."""

from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from graphs import clustered as make_clustered

from pipeline.recommenders import ItemFeatures, get_recommender
from pipeline.recommenders.lattice import LATTICE, edge_spmm, knn_edges
from pipeline.training.sampling import epoch_batches

N_GROUPS = 3


clustered = partial(make_clustered, n_users=30, n_items=24, per_user=6, n_groups=N_GROUPS)


def features(n_items: int, image=True, text=True, seed=0) -> ItemFeatures:
    """Random image [N, 6] and text [N, 4] features (no ties among the similarities)."""
    gen = torch.Generator().manual_seed(seed)
    return ItemFeatures(
        image=torch.randn(n_items, 6, generator=gen) if image else None,
        text=torch.randn(n_items, 4, generator=gen) if text else None,
    )


def dense_knn(x: np.ndarray, k: int) -> np.ndarray:
    """MMRec's build_sim + build_knn_neighbourhood: each row keeps its top-k cosines."""
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = unit @ unit.T
    keep = np.argsort(-sim, axis=1)[:, :k]
    out = np.zeros_like(sim)
    np.put_along_axis(out, keep, np.take_along_axis(sim, keep, axis=1), axis=1)
    return out


def laplacian(a: np.ndarray) -> np.ndarray:
    """MMRec's compute_normalized_laplacian: D^-1/2 A D^-1/2 with D the row sums."""
    d = a.sum(axis=1) ** -0.5
    return d[:, None] * a * d[None, :]


def sparse(index: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    return torch.sparse_coo_tensor(index, values, (n, n), check_invariants=True)


def build(data, feats, **config) -> LATTICE:
    torch.manual_seed(0)
    return get_recommender("lattice").build(data, feats, {"embedding_size": 8, **config})


def test_knn_edges_match_dense_brute_force():
    x = torch.randn(50, 7, generator=torch.Generator().manual_seed(1))
    index, sims = knn_edges(x, 6)
    assert index.shape == (2, 300) and sims.shape == (300,)
    got = sparse(index, sims, 50).to_dense().numpy()
    np.testing.assert_allclose(got, dense_knn(x.numpy(), 6), atol=1e-5)


def test_item_graph_equals_mmrec_dense_formula():
    data = clustered(n_items=40)
    feats = features(40)
    model = build(data, feats, knn_k=5, lambda_coeff=0.7, feat_embed_dim=3)
    with torch.no_grad():
        model.modal_weight.copy_(torch.tensor([0.2, 1.1]))  # unequal modality weights
        w = torch.softmax(model.modal_weight, 0).numpy()
        proj = {m: model.projections[m](getattr(feats, m)).numpy() for m in ("image", "text")}
        got = model.item_graph().to_dense().numpy()
    learned = laplacian(w[0] * dense_knn(proj["image"], 5) + w[1] * dense_knn(proj["text"], 5))
    fixed = w[0] * laplacian(dense_knn(feats.image.numpy(), 5)) + w[1] * laplacian(
        dense_knn(feats.text.numpy(), 5)
    )
    np.testing.assert_allclose(got, 0.3 * learned + 0.7 * fixed, atol=1e-5)


def test_item_graph_stays_sparse():
    n, k = 300, 4
    data = clustered(n_users=60, n_items=n)
    model = build(data, features(n), knn_k=k)
    for m in ("image", "text"):
        assert getattr(model, f"{m}_fixed_values").numel() == n * k
    graph = model.item_graph()
    assert graph.layout == torch.sparse_coo
    # two modalities x (fixed + learned), k per row each, overlaps merged
    assert n * k <= graph._nnz() <= 4 * n * k < n * n
    dense = [t for t in [*model.parameters(), *model.buffers()] if t.layout == torch.strided]
    assert all(t.numel() < n * n for t in dense)


def test_gradients_reach_projections_through_learned_graph_on_first_batch():
    data = clustered()
    model = build(data, features(data.n_items))
    model.train()
    batches = epoch_batches(data, 32, seed=0, epoch=0)
    model.loss(*next(batches)).backward()
    learned_side = [
        model.projections["image"].weight,
        model.projections["text"].bias,
        model.modal_weight,
        model.image_features,
        model.text_features,
    ]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learned_side)
    model.zero_grad(set_to_none=True)
    model.loss(*next(batches)).backward()  # later batches: the epoch's graph, detached
    assert model.projections["image"].weight.grad is None
    assert model.item_embedding.weight.grad.abs().sum() > 0
    model.train()  # a new epoch rebuilds the graph with gradients
    model.loss(*next(batches)).backward()
    assert model.projections["image"].weight.grad.abs().sum() > 0


def test_lambda_one_ignores_the_learned_graph():
    data = clustered()
    feats = features(data.n_items)
    fixed_only = build(data, feats, lambda_coeff=1.0)
    mixed = build(data, feats, lambda_coeff=0.5)
    users = torch.arange(data.n_users)
    for model, changes in ((fixed_only, False), (mixed, True)):
        model.eval()
        before = model.score(users)
        with torch.no_grad():
            for layer in model.projections.values():
                layer.weight.normal_()
        model.eval()  # drop the cached embeddings
        assert changes == (not torch.allclose(before, model.score(users)))
    weight = torch.softmax(fixed_only.modal_weight.detach(), 0)
    fixed = torch.zeros(data.n_items, data.n_items)
    for w, m in zip(weight, ("image", "text"), strict=True):
        index, values = (
            getattr(fixed_only, f"{m}_fixed_index"),
            getattr(fixed_only, f"{m}_fixed_values"),
        )
        fixed += w * sparse(index, values, data.n_items).to_dense()
    torch.testing.assert_close(fixed_only.item_graph().to_dense(), fixed)
    fixed_only.train()
    fixed_only.loss(*next(epoch_batches(data, 32, seed=0, epoch=0))).backward()
    assert all(p.grad is None for p in fixed_only.projections.parameters())


@pytest.mark.parametrize("modality", ["image", "text"])
def test_one_modality_is_enough(modality):
    data = clustered()
    feats = features(data.n_items, image=modality == "image", text=modality == "text")
    model = build(data, feats, train_features=False)
    assert model.modalities == [modality] and list(model.projections) == [modality]
    assert model.modal_weight.shape == (1,)
    assert f"{modality}_features" not in model.state_dict()  # a buffer when not trained
    model.train()
    loss = model.loss(*next(epoch_batches(data, 32, seed=0, epoch=0)))
    loss.backward()
    assert torch.isfinite(loss) and model.projections[modality].weight.grad.abs().sum() > 0
    assert model.score(torch.tensor([0, 1])).shape == (2, data.n_items)


def test_learns_the_clusters():
    data = clustered()
    gen = torch.Generator().manual_seed(0)
    group = F.one_hot(torch.arange(data.n_items) % N_GROUPS, 4).float()
    feats = ItemFeatures(image=group + 0.1 * torch.randn(data.n_items, 4, generator=gen))
    model = build(data, feats, knn_k=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for epoch in range(20):
        model.train()
        total = 0.0
        for users, pos, neg in epoch_batches(data, 32, seed=0, epoch=epoch):
            loss = model.loss(users, pos, neg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
        losses.append(total)
    assert losses[-1] < 0.3 * losses[0]
    model.eval()
    top = model.score(torch.arange(data.n_users)).topk(4, dim=1).indices
    in_group = (top % N_GROUPS == (torch.arange(data.n_users) % N_GROUPS)[:, None]).float()
    assert in_group.mean() > 0.9


def test_eval_cache_is_dropped_by_train_and_load_state_dict():
    data = clustered()
    model = build(data, features(data.n_items))
    model.eval()
    users = torch.arange(5)
    first = model.score(users)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.user_embedding.weight.mul_(2)
    assert torch.equal(model.score(users), first)  # cached while in eval mode
    model.train()
    model.eval()
    assert not torch.allclose(model.score(users), first)
    model.load_state_dict(state)
    torch.testing.assert_close(model.score(users), first)


def test_bad_config_values_raise():
    data = clustered()
    with pytest.raises(ValueError, match=r"lambda_coeff = 1.5; use a value in \[0, 1\]"):
        build(data, features(data.n_items), lambda_coeff=1.5)
    with pytest.raises(ValueError, match="knn_k = 0; use at least 1"):
        build(data, features(data.n_items), knn_k=0)
    with pytest.raises(ValueError, match="lattice uses item features"):
        get_recommender("lattice").build(data, None, {})


def test_edge_spmm_gradients_match_dense():
    gen = torch.Generator().manual_seed(2)
    index, _ = knn_edges(torch.randn(12, 3, generator=gen), 4)
    index = sparse(index, torch.ones(48), 12).coalesce().indices()
    values = torch.randn(48, dtype=torch.float64, generator=gen, requires_grad=True)
    x = torch.randn(12, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    weights = torch.randn(12, 5, dtype=torch.float64, generator=gen)
    (edge_spmm(index, values, x, 12) * weights).sum().backward()
    got = values.grad.clone(), x.grad.clone()
    values.grad = x.grad = None
    dense = torch.zeros(12, 12, dtype=torch.float64).index_put((index[0], index[1]), values)
    ((dense @ x) * weights).sum().backward()
    torch.testing.assert_close(got, (values.grad, x.grad))
