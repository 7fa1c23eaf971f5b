"""LightGCN: ID embeddings smoothed by linear propagation over the user-item graph.

He et al., "LightGCN: Simplifying and Powering Graph Convolution Network for
Recommendation", SIGIR 2020. Follows MMRec's ``src/models/lightgcn.py``: user and item
embeddings (Xavier-uniform init) are propagated ``n_layers`` times over the symmetric-normalised
train graph D^-1/2 A D^-1/2 (no self-loops), the final embedding is the mean of the layer-0..L
embeddings, score = inner product; loss = BPR + reg_weight * EmbLoss of the batch's layer-0
embeddings. MMRec grid-searches n_layers {1, 2, 3, 4} and reg_weight {1e-2, ..., 1e-6}.
Departs from MMRec only in caching the propagated embeddings while in eval mode (MMRec
re-propagates for every batch of evaluated users) and in multiplying by a CSR graph whose
backward is one more product with the same (symmetric) graph, not a COO transpose per step.
The propagation is one autograd node (``smooth``) that writes its sparse products into
buffers reused from step to step, with the float operations of the layer-by-layer graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.graph import normalized_adjacency, to_csr
from pipeline.interactions import InteractionData
from pipeline.losses import bpr_loss, l2_reg
from pipeline.recommenders import register_recommender
from pipeline.recommenders.base import EmbeddingConfig, GraphRecommender, ItemFeatures


@dataclass(frozen=True)
class LightGCNConfig(EmbeddingConfig):
    """LightGCN hyperparameters (MMRec's LightGCN.yaml: embedding 64; n_layers and reg_weight
    from its grid, at the LightGCN paper's choice)."""

    n_layers: int = 3  # propagation steps; the paper's choice, in MMRec's grid {1, 2, 3, 4}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_layers < 0:
            raise ValueError(f"n_layers = {self.n_layers}; use a value >= 0")


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
        shape = (users.shape[0] + items.shape[0], users.shape[1])
        ego = _scratch(buffers, "ego", users.new_empty(shape))
        torch.cat([users, items], out=ego)
        total = torch.empty_like(ego)
        if n_layers == 0:
            return torch.div(ego, 1, out=total)
        layer = ego
        for k in range(n_layers):
            nxt = _scratch(buffers, "ab"[k % 2], ego)
            torch.addmm(nxt, adjacency, layer, beta=0, out=nxt)
            if k == 0:
                torch.add(ego, nxt, out=total)
            else:
                total.add_(nxt)
            layer = nxt
        return total.div_(n_layers + 1)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        n_layers, buffers = ctx.n_layers, ctx.buffers
        grad = grad.contiguous()
        if n_layers == 0:
            out = grad / 1
        else:
            share = torch.div(grad, n_layers + 1, out=_scratch(buffers, "g", grad))
            cur = share
            for k in range(n_layers):
                last = k == n_layers - 1  # the returned gradient gets its own memory
                out = torch.empty_like(grad) if last else _scratch(buffers, "ab"[k % 2], grad)
                torch.addmm(out, ctx.adjacency, cur, beta=0, out=out)
                out.add_(share)
                cur = out
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


@register_recommender("lightgcn")
class LightGCN(GraphRecommender):
    """e = mean_{l=0..L} Â^l e^(0) over users and items; score(u, i) = <e_u, e_i>."""

    uses_features = False
    config_class = LightGCNConfig

    def __init__(
        self, data: InteractionData, features: ItemFeatures | None, config: LightGCNConfig
    ):
        super().__init__(data, features, config)
        self.user_embedding = nn.Parameter(torch.empty(self.n_users, config.embedding_size))
        self.item_embedding = nn.Parameter(torch.empty(self.n_items, config.embedding_size))
        nn.init.xavier_uniform_(self.user_embedding)
        nn.init.xavier_uniform_(self.item_embedding)
        adjacency = compact_csr(normalized_adjacency(data))
        self.register_buffer("adjacency", adjacency, persistent=False)
        self._scratch: dict[str, torch.Tensor] = {}

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Propagated (users [U, d], items [I, d]): the mean of the layer-0..L embeddings."""
        final = smooth(
            self.user_embedding,
            self.item_embedding,
            self.adjacency,
            self.config.n_layers,
            self._scratch,
        )
        return final[: self.n_users], final[self.n_users :]

    def loss(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """BPR loss on propagated embeddings + reg_weight * EmbLoss on the layer-0 ones."""
        user_all, item_all = self.forward()
        u, p, n = user_all[users], item_all[pos], item_all[neg]  # [B, d] each
        ranking = bpr_loss((u * p).sum(dim=1), (u * n).sum(dim=1))
        ego = (self.user_embedding[users], self.item_embedding[pos], self.item_embedding[neg])
        return ranking + self.config.reg_weight * l2_reg(*ego)

    def score(self, users: torch.Tensor) -> torch.Tensor:
        """Inner products of the propagated embeddings with every item, [B, n_items]."""
        user_all, item_all = self.propagated()
        return user_all[users] @ item_all.T
