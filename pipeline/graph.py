"""Graph building blocks shared by the graph recommenders, written once.

All graphs are torch sparse tensors (no torch_scatter / torch_geometric); kNN item graphs come
from FAISS top-k search, so no dense N x N matrix is ever built.
"""

from __future__ import annotations

import warnings

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from pipeline.interactions import InteractionData


def to_csr(matrix: torch.Tensor) -> torch.Tensor:
    """The sparse COO ``matrix`` in CSR layout, which multiplies several times faster on CPU
    (torch's "CSR support is in beta" warning silenced)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return matrix.to_sparse_csr()


class _ConstantSpMM(torch.autograd.Function):
    """``matrix @ x`` for a constant sparse ``matrix`` whose transpose is given: the backward
    is one more sparse product (torch.sparse.mm would transpose a COO every step)."""

    @staticmethod
    def forward(ctx, matrix: torch.Tensor, transposed: torch.Tensor, x: torch.Tensor):
        ctx.transposed = transposed
        return matrix @ x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, None, ctx.transposed @ grad


def constant_spmm(
    matrix: torch.Tensor, x: torch.Tensor, transposed: torch.Tensor | None = None
) -> torch.Tensor:
    """``matrix @ x`` for a constant sparse (CSR) ``matrix``, differentiable in ``x``;
    ``transposed`` is its transpose (None: the matrix is symmetric)."""
    return _ConstantSpMM.apply(matrix, matrix if transposed is None else transposed, x)


def propagate(
    adjacency: torch.Tensor, ego: torch.Tensor, n_layers: int, dropout: float = 0.0
) -> torch.Tensor:
    """LightGCN smoothing: the mean of ``ego`` [N, D] and its ``n_layers`` propagations by the
    constant symmetric sparse ``adjacency`` [N, N]; ``dropout`` > 0 drops entries of every
    propagated layer (SLMRec's feature dropout), the dropped layer feeding the next one."""
    layer, total = ego, ego
    for _ in range(n_layers):
        layer = constant_spmm(adjacency, layer)
        if dropout > 0:
            layer = F.dropout(layer, dropout, training=True)
        total = total + layer
    return total / (n_layers + 1)


def sym_normalize(index: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """D^-1/2 A D^-1/2 of the [n, n] sparse matrix given by COO ``index`` [2, E] and ``values``.

    Rows with zero degree stay zero. Returns a coalesced sparse COO tensor.
    """
    deg = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, index[0], values)
    inv_sqrt = torch.where(deg > 0, deg.clamp(min=1e-12).rsqrt(), torch.zeros_like(deg))
    norm = inv_sqrt[index[0]] * values * inv_sqrt[index[1]]
    return torch.sparse_coo_tensor(index, norm, (n, n), check_invariants=False).coalesce()


def normalized_adjacency(data: InteractionData) -> torch.Tensor:
    """The symmetric-normalised user-item train graph [(U + I), (U + I)] (LightGCN's Â).

    Users are rows 0..U-1, items rows U..U+I-1.
    """
    users = torch.from_numpy(data.train_users.astype(np.int64))
    items = torch.from_numpy(data.train_items.astype(np.int64)) + data.n_users
    index = torch.cat([torch.stack([users, items]), torch.stack([items, users])], dim=1)
    values = torch.ones(index.shape[1], dtype=torch.float32)
    return sym_normalize(index, values, data.n_users + data.n_items)


def knn_neighbours(vectors: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` cosine neighbours of every row (itself included), by exact FAISS search.

    Returns (ids [N, k] int64, similarities [N, k] float32).
    """
    x = vectors.detach().cpu().numpy() if isinstance(vectors, torch.Tensor) else vectors
    x = np.ascontiguousarray(x, dtype=np.float32).copy()
    if not 1 <= k <= len(x):
        raise ValueError(f"k = {k}; need 1 <= k <= {len(x)} (the number of rows)")
    faiss.normalize_L2(x)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    sims, ids = index.search(x, k)
    return ids.astype(np.int64), sims


def knn_graph(vectors: np.ndarray | torch.Tensor, k: int) -> torch.Tensor:
    """A sparse kNN item-item graph with unit weights, symmetric-normalised, [N, N].

    Each row keeps its top-``k`` cosine neighbours (as LATTICE's ``build_knn_neighbourhood``,
    without the dense similarity matrix), then D^-1/2 S D^-1/2.
    """
    ids, _ = knn_neighbours(vectors, k)
    n = ids.shape[0]
    rows = torch.arange(n).repeat_interleave(k)
    index = torch.stack([rows, torch.from_numpy(ids.reshape(-1))])
    return sym_normalize(index, torch.ones(index.shape[1]), n)
