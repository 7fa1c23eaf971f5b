"""Graph building blocks shared by the graph recommenders, written once.

All graphs are torch sparse tensors (no torch_scatter / torch_geometric); kNN item graphs come
from FAISS top-k search, so no dense N x N matrix is ever built.
"""

from __future__ import annotations

import warnings
from typing import Any

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.interactions import InteractionData


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


def compact_csr(matrix: torch.Tensor) -> torch.Tensor:
    """The sparse ``matrix`` in CSR layout with int32 indices when they fit: the CPU sparse
    product then skips converting its int64 indices to int32 on every call."""
    csr = to_csr(matrix)
    if csr.values().numel() >= 2**31 or max(csr.shape) >= 2**31:
        return csr
    return torch.sparse_csr_tensor(
        csr.crow_indices().to(torch.int32),
        csr.col_indices().to(torch.int32),
        csr.values(),
        csr.shape,
        check_invariants=False,  # the indices of a valid CSR tensor
    )


def _scratch(buffers: dict[str, torch.Tensor], name: str, like: torch.Tensor) -> torch.Tensor:
    """The reusable buffer ``name`` shaped and typed as ``like`` (reallocated on a change)."""
    buf = buffers.get(name)
    if buf is None or (buf.shape, buf.dtype, buf.device) != (like.shape, like.dtype, like.device):
        buf = buffers[name] = torch.empty_like(like, memory_format=torch.contiguous_format)
    return buf


def _smooth_into(
    users: torch.Tensor,
    items: torch.Tensor,
    adjacency: torch.Tensor,
    n_layers: int,
    buffers: dict[str, torch.Tensor],
    total: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ego, total): [users; items] in the scratch buffer ``ego`` and the mean of its
    layer-0..``n_layers`` propagations written into ``total``."""
    shape = (users.shape[0] + items.shape[0], users.shape[1])
    ego = _scratch(buffers, "ego", users.new_empty(shape))
    torch.cat([users, items], out=ego)
    if n_layers == 0:
        return ego, torch.div(ego, 1, out=total)
    layer = ego
    for k in range(n_layers):
        nxt = _scratch(buffers, "ab"[k % 2], ego)
        torch.addmm(nxt, adjacency, layer, beta=0, out=nxt)
        if k == 0:
            torch.add(ego, nxt, out=total)
        else:
            total.add_(nxt)
        layer = nxt
    return ego, total.div_(n_layers + 1)


def _smooth_grad(
    grad: torch.Tensor, adjacency: torch.Tensor, n_layers: int, buffers: dict[str, torch.Tensor]
) -> torch.Tensor:
    """The gradient of the smoothed [users; items] with respect to the ego ones, given
    ``grad`` (contiguous; may be the scratch buffer "g"): by Horner's rule, in fresh memory."""
    if n_layers == 0:
        return grad / 1
    share = torch.div(grad, n_layers + 1, out=_scratch(buffers, "g", grad))
    cur = share
    for k in range(n_layers):
        last = k == n_layers - 1  # the returned gradient gets its own memory
        out = torch.empty_like(grad) if last else _scratch(buffers, "ab"[k % 2], grad)
        torch.addmm(out, adjacency, cur, beta=0, out=out)
        out.add_(share)
        cur = out
    return out


class _Smooth(torch.autograd.Function):
    """LightGCN smoothing of [users; items] over a constant symmetric sparse graph: forward
    (e + A e + ... + A^L e) / (L + 1), backward the same sum of products by Horner's rule;
    the intermediate layers live in reused buffers. The float operations are those of the
    layer-by-layer autograd graph (same products, additions in the same order), so the
    results are bitwise the same."""

    @staticmethod
    def forward(ctx, users, items, adjacency, n_layers, buffers):  # type: ignore[override]
        ctx.adjacency, ctx.n_layers, ctx.buffers = adjacency, n_layers, buffers
        ctx.n_users = users.shape[0]
        total = users.new_empty((users.shape[0] + items.shape[0], users.shape[1]))
        return _smooth_into(users, items, adjacency, n_layers, buffers, total)[1]

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        out = _smooth_grad(grad.contiguous(), ctx.adjacency, ctx.n_layers, ctx.buffers)
        return out[: ctx.n_users], out[ctx.n_users :], None, None, None


def smooth(
    users: torch.Tensor,
    items: torch.Tensor,
    adjacency: torch.Tensor,
    n_layers: int,
    buffers: dict[str, Any],
) -> torch.Tensor:
    """LightGCN's mean of the layer-0..``n_layers`` propagations of [users; items] by the
    constant symmetric sparse ``adjacency``, [U + I, d], differentiable in both inputs;
    ``buffers`` (a dict the caller keeps) holds the scratch reused by the next call."""
    return _Smooth.apply(users, items, adjacency, n_layers, buffers)


class _SmoothRows(torch.autograd.Function):
    """``smooth`` read at a BPR batch's rows only, with the ego embeddings at the same rows:
    the full tables stay in reused buffers, and the backward scatters the rows' gradients
    into one table before the products instead of autograd's zero-filled table per gather
    and per slice. The negatives' gradients are summed on their own before they join the
    positives', as autograd sums one table per gather, so the smoothed rows' gradients are
    bitwise those of the gathers this replaces."""

    @staticmethod
    def forward(ctx, users, items, adjacency, n_layers, buffers, rows):  # type: ignore[override]
        ctx.adjacency, ctx.n_layers, ctx.buffers = adjacency, n_layers, buffers
        ctx.n_users = users.shape[0]
        ctx.save_for_backward(rows)
        ctx.set_materialize_grads(False)
        shape = (users.shape[0] + items.shape[0], users.shape[1])
        total = _scratch(buffers, "total", users.new_empty(shape))
        ego, total = _smooth_into(users, items, adjacency, n_layers, buffers, total)
        return total[rows], ego[rows]

    @staticmethod
    def backward(ctx, grad_smoothed, grad_ego):  # type: ignore[override]
        (rows,) = ctx.saved_tensors
        buffers, n_users = ctx.buffers, ctx.n_users
        table = buffers["total"]  # its forward values are no longer needed
        if grad_smoothed is None:
            out = torch.zeros_like(table)
        else:
            users_pos, neg = rows.tensor_split([2 * len(rows) // 3])
            grad_users_pos, grad_neg = grad_smoothed.tensor_split([len(users_pos)])
            grad = _scratch(buffers, "g", table).zero_()
            grad.index_add_(0, users_pos, grad_users_pos)
            items = grad.shape[0] - n_users
            negatives = _scratch(buffers, "neg", grad.new_empty((items, grad.shape[1])))
            negatives.zero_().index_add_(0, neg - n_users, grad_neg)
            grad[n_users:].add_(negatives)
            out = _smooth_grad(grad, ctx.adjacency, ctx.n_layers, buffers)
        if grad_ego is not None:
            out.index_add_(0, rows, grad_ego)
        return out[:n_users], out[n_users:], None, None, None, None


def smooth_rows(
    users: torch.Tensor,
    items: torch.Tensor,
    adjacency: torch.Tensor,
    n_layers: int,
    buffers: dict[str, Any],
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """For a BPR ``batch`` (users, positive items, negative items; [B] each): the rows of
    ``smooth(...)`` and of [users; items] at those users then items, [3B, d] each,
    differentiable in ``users`` and ``items``, for a training loss that reads only them.
    Values are bitwise the gathers', and so are the gradients through the smoothed rows;
    through the ego rows they may differ in the order a row's contributions are summed."""
    user_rows, pos, neg = batch
    n_users = users.shape[0]
    rows = torch.cat([user_rows, pos + n_users, neg + n_users])
    return _SmoothRows.apply(users, items, adjacency, n_layers, buffers, rows)


def row_slice(matrix: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` [R] of the CSR ``matrix`` [N, M] as a CSR [R, M] (entries kept in order,
    so each row's product sums the same terms in the same order as the full matrix's)."""
    crow, col, values = matrix.crow_indices(), matrix.col_indices(), matrix.values()
    start = crow[rows]
    counts = crow[rows + 1] - start
    sliced_crow = torch.zeros(len(rows) + 1, dtype=crow.dtype, device=crow.device)
    torch.cumsum(counts, 0, out=sliced_crow[1:])
    offsets = torch.repeat_interleave(start - sliced_crow[:-1], counts)
    at = offsets + torch.arange(len(offsets), dtype=crow.dtype, device=crow.device)
    shape = (len(rows), matrix.shape[1])
    return torch.sparse_csr_tensor(sliced_crow, col[at], values[at], shape, check_invariants=False)


class _RowsSpMM(torch.autograd.Function):
    """``(matrix @ x)[rows]`` through the row slice alone; the backward scatters the rows'
    gradient into a zero table and multiplies it by the whole transposed matrix, given:
    each output row then sums the same terms in the same order as the slice's transpose
    would (the other rows add exact zeros), without transposing the slice, which sorts its
    entries every step."""

    @staticmethod
    def forward(ctx, matrix, rows, x, transposed):  # type: ignore[override]
        ctx.transposed = transposed
        ctx.save_for_backward(rows)
        return row_slice(matrix, rows) @ x

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (rows,) = ctx.saved_tensors
        transposed = ctx.transposed
        full = grad.new_zeros((transposed.shape[1], grad.shape[1]))
        full.index_add_(0, rows, grad)
        return None, None, transposed @ full, None


def rows_spmm(
    matrix: torch.Tensor, rows: torch.Tensor, x: torch.Tensor, transposed: torch.Tensor
) -> torch.Tensor:
    """``(matrix @ x)[rows]`` for a constant CSR ``matrix`` whose CSR ``transposed`` is given,
    differentiable in ``x``; the forward costs the ``rows`` (distinct) only."""
    return _RowsSpMM.apply(matrix, rows, x, transposed)


def bipartite_blocks(adjacency: torch.Tensor, n_users: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two off-diagonal blocks of a coalesced bipartite user-item ``adjacency`` (COO,
    users first), as CSR: user -> item [U, I] and item -> user [I, U], same values. Each is
    the other's transpose when the adjacency is symmetric."""
    index, values = adjacency.indices(), adjacency.values()
    n_items = adjacency.shape[0] - n_users
    users_first = index[0] < n_users
    shift = torch.tensor([[0], [n_users]], device=index.device)
    blocks = []
    for keep, offset, shape in (
        (users_first, shift, (n_users, n_items)),
        (~users_first, shift.flip(0), (n_items, n_users)),
    ):
        coo = torch.sparse_coo_tensor(
            index[:, keep] - offset, values[keep], shape, is_coalesced=True, check_invariants=False
        )
        blocks.append(compact_csr(coo))
    return blocks[0], blocks[1]


def propagate_bipartite(
    user_items: torch.Tensor,
    item_users: torch.Tensor,
    users: torch.Tensor,
    items: torch.Tensor,
    n_layers: int,
    user_rows: torch.Tensor | None = None,
    item_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``propagate`` over a bipartite graph of K channels whose users all start from the same
    ``users`` [U, d]: items start from ``items`` [I, K * d]. Returns (users [U, K, d],
    items [I, K, d]), or only the ``user_rows`` / ``item_rows`` when given.

    The same sums as ``propagate`` on [users repeated K times ; items] over the full graph
    (``user_items`` [U, I] and ``item_users`` [I, U] are its blocks, each the other's
    transpose), for less work: by linearity the part that started on the users is the same in
    every channel and is propagated once at width d, and each layer multiplies by the one block
    that can reach a side (a bipartite graph alternates sides); the last layer is computed at
    the requested rows only.
    """
    d = users.shape[1]
    user_side, item_side = [users], [items]  # layer k of each side: width d or K * d
    for layer in range(1, n_layers + 1):
        last = layer == n_layers
        on_users, on_items = user_side[-1], item_side[-1]
        if last and user_rows is not None:
            user_side.append(rows_spmm(user_items, user_rows, on_items, item_users))
        else:
            user_side.append(constant_spmm(user_items, on_items, item_users))
        if last and item_rows is not None:
            item_side.append(rows_spmm(item_users, item_rows, on_users, user_items))
        else:
            item_side.append(constant_spmm(item_users, on_users, user_items))
    outputs = []
    for side, rows in ((user_side, user_rows), (item_side, item_rows)):
        total = None
        for layer, tensor in enumerate(side):
            if rows is not None and (layer < n_layers or layer == 0):
                tensor = tensor[rows]
            tensor = tensor.view(tensor.shape[0], -1, d)  # [R, 1 or K, d]: broadcast over K
            total = tensor if total is None else total + tensor
        outputs.append((total / (n_layers + 1)).expand(-1, items.shape[1] // d, -1))
    return outputs[0], outputs[1]


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
