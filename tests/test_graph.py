import numpy as np
import pytest
import torch

from pipeline.data.interactions import InteractionData
from pipeline.recommenders.graph import (
    compact_csr,
    knn_graph,
    knn_neighbours,
    normalized_adjacency,
    row_slice,
    rows_spmm,
    smooth,
    smooth_rows,
)


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


@pytest.mark.parametrize("n_layers", [0, 1, 3])
@pytest.mark.parametrize("use_ego", [True, False])
def test_smooth_rows_equals_gathering_rows_of_the_smoothed_table(n_layers, use_ego):
    """The training path of LightGCN and LATTICE against the gathers from ``smooth`` it
    replaced, on BPR batches that repeat users and items (an item as positive and as
    negative): values bitwise; gradients bitwise through the smoothed rows and up to the
    order of summation through the ego rows; over several steps (the buffers are reused)."""
    rng = np.random.default_rng(3)
    n_users, n_items, b = 40, 25, 30
    users, items = np.nonzero(rng.random((n_users, n_items)) < 0.2)
    data = InteractionData.from_arrays(users, items, np.array(["train"] * len(users)))
    graph = compact_csr(normalized_adjacency(data))
    buffers: dict = {}
    for step in range(3):
        u = torch.randn(n_users, 8, generator=torch.Generator().manual_seed(step))
        i = torch.randn(n_items, 8, generator=torch.Generator().manual_seed(step + 10))
        batch = tuple(torch.from_numpy(rng.integers(0, n, b)) for n in (n_users, n_items, n_items))
        weights = torch.randn(3 * b, 8, generator=torch.Generator().manual_seed(step + 20))
        ours = [u.clone().requires_grad_(), i.clone().requires_grad_()]
        final, ego = smooth_rows(*ours, graph, n_layers, buffers, batch)
        theirs = [u.clone().requires_grad_(), i.clone().requires_grad_()]
        user_all, item_all = smooth(*theirs, graph, n_layers, {}).split([n_users, n_items])
        expected = torch.cat([user_all[batch[0]], item_all[batch[1]], item_all[batch[2]]])
        ego_expected = torch.cat([theirs[0][batch[0]], theirs[1][batch[1]], theirs[1][batch[2]]])
        assert torch.equal(final, expected)
        assert torch.equal(ego, ego_expected)
        ((final * weights).sum() + (ego.pow(2).sum() if use_ego else 0)).backward()
        ((expected * weights).sum() + (ego_expected.pow(2).sum() if use_ego else 0)).backward()
        for a, b_ in zip(ours, theirs, strict=True):
            if use_ego:
                torch.testing.assert_close(a.grad, b_.grad, rtol=1e-5, atol=1e-6)
            else:
                assert torch.equal(a.grad, b_.grad)


def test_rows_spmm_backward_through_the_whole_transpose_equals_the_slices_transpose():
    """The last graph layer of MMGCN, MMGCL and SLMRec: (A x)[rows] from the row slice, and
    its gradient from the zero-padded rows' gradient times the whole transposed matrix,
    bitwise what the slice's own transpose gives (each output row sums the same terms in the
    same order; the other rows add exact zeros)."""
    rng = np.random.default_rng(5)
    n, m = 60, 45
    dense = np.where(rng.random((n, m)) < 0.15, rng.random((n, m)), 0).astype(np.float32)
    matrix = compact_csr(torch.from_numpy(dense).to_sparse())
    transposed = compact_csr(torch.from_numpy(dense.T.copy()).to_sparse())
    rows = torch.from_numpy(np.sort(rng.choice(n, 25, replace=False)))
    x = torch.randn(m, 7, generator=torch.Generator().manual_seed(0), requires_grad=True)
    out = rows_spmm(matrix, rows, x, transposed)
    assert torch.equal(out, row_slice(matrix, rows) @ x.detach())
    torch.testing.assert_close(out, (torch.from_numpy(dense) @ x.detach())[rows])
    grad = torch.randn(25, 7, generator=torch.Generator().manual_seed(1))
    out.backward(grad)
    assert torch.equal(x.grad, row_slice(matrix, rows).t() @ grad)
