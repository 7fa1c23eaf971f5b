import numpy as np
import torch

from pipeline.data.interactions import InteractionData
from pipeline.recommenders.graph import knn_graph, knn_neighbours, normalized_adjacency


def test_normalized_adjacency_matches_dense_formula():
    users, items = np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 0, 1, 2])
    data = InteractionData.from_arrays(users, items, np.array(["train"] * 6))
    a = np.zeros((6, 6))
    a[users, items + 3] = a[items + 3, users] = 1
    d = a.sum(1)
    expected = a / np.sqrt(np.outer(d, d))
    got = normalized_adjacency(data).to_dense().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_knn_graph_keeps_top_k_per_row_and_normalises():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 8)).astype(np.float32)
    ids, sims = knn_neighbours(x, 4)
    assert (ids[:, 0] == np.arange(30)).all()  # each row is its own nearest neighbour
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    brute = np.argsort(-(xn @ xn.T), axis=1)[:, :4]
    assert (np.sort(ids, axis=1) == np.sort(brute, axis=1)).all()
    g = knn_graph(torch.from_numpy(x), 4).to_dense()
    assert ((g > 0).sum(1) == 4).all()
    # every row has degree 4, so each kept edge weighs 1/sqrt(4 * 4) and rows sum to 1
    np.testing.assert_allclose(g[g > 0].numpy(), 0.25)
    np.testing.assert_allclose(g.sum(1).numpy(), 1.0, rtol=1e-6)
