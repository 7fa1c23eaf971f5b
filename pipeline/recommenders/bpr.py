"""BPR: matrix factorisation trained with the BPR loss, ID embeddings only.

Rendle et al., "BPR: Bayesian Personalized Ranking from Implicit Feedback", UAI 2009.
Follows MMRec's ``src/models/bpr.py``: user and item ``nn.Embedding`` with Xavier-normal
init, inner-product score, loss = BPR + reg_weight * EmbLoss(u, pos, neg).

The loss is one autograd node whose backward writes the two tables' gradients from their
closed form (the same maths as autograd through the gathers, products and norms, summed in
another order): a step is mostly small operations, and this takes ~25% off it at Amazon
Baby's size (``benchmarks/bench_steps.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import FunctionCtx, once_differentiable

from pipeline.data.interactions import InteractionData
from pipeline.recommenders import register_recommender
from pipeline.recommenders.base import EmbeddingConfig, ItemFeatures, Recommender


class _BPRObjective(torch.autograd.Function):
    """mean softplus(<u, n> - <u, p>) + reg * (|U_b| + |P_b| + |N_b|) / B over a batch's rows
    of the user table and item table (|.| the Frobenius norm: MMRec's BPRLoss and EmbLoss),
    with the tables' gradients in closed form."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        user_table: torch.Tensor,
        item_table: torch.Tensor,
        users: torch.Tensor,
        pos: torch.Tensor,
        neg: torch.Tensor,
        reg_weight: float,
    ) -> torch.Tensor:
        u = user_table.index_select(0, users)
        p, n = item_table.index_select(0, pos), item_table.index_select(0, neg)
        gap = n - p
        margin = torch.linalg.vecdot(u, gap)  # neg score - pos score
        norms = torch.stack([torch.linalg.vector_norm(t) for t in (u, p, n)])
        ctx.save_for_backward(u, p, n, gap, margin, norms, users, pos, neg)
        ctx.reg_weight = reg_weight
        ctx.shapes = (user_table.shape, item_table.shape)
        return F.softplus(margin).mean() + reg_weight * norms.sum() / len(users)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        u, p, n, gap, margin, norms, users, pos, neg = ctx.saved_tensors
        scale = grad / len(users)
        w = (torch.sigmoid(margin) * scale).unsqueeze(1)  # d loss / d margin, per row
        # d |E| / d E = E / |E| (0 for an all-zero E, as autograd takes it)
        reg = torch.where(norms > 0, ctx.reg_weight * scale / norms, 0.0)
        wu = w * u
        grad_u = torch.addcmul(u * reg[0], w, gap)
        grad_p = torch.sub(p * reg[1], wu)
        grad_n = torch.add(n * reg[2], wu)
        user_shape, item_shape = ctx.shapes
        user_grad = u.new_zeros(user_shape).index_add_(0, users, grad_u)
        item_grad = p.new_zeros(item_shape).index_add_(0, pos, grad_p).index_add_(0, neg, grad_n)
        return user_grad, item_grad, None, None, None, None


@dataclass(frozen=True)
class BPRConfig(EmbeddingConfig):
    """BPR hyperparameters (defaults: MMRec's BPR.yaml / LMM4Rec's overall.yaml)."""


@register_recommender("bpr")
class BPR(Recommender):
    """Matrix factorisation: score(u, i) = <e_u, e_i>."""

    uses_features = False
    config_class = BPRConfig

    def __init__(self, data: InteractionData, features: ItemFeatures | None, config: BPRConfig):
        super().__init__(data, features, config)
        self.user_embedding = nn.Embedding(self.n_users, config.embedding_size)
        self.item_embedding = nn.Embedding(self.n_items, config.embedding_size)
        nn.init.xavier_normal_(self.user_embedding.weight)
        nn.init.xavier_normal_(self.item_embedding.weight)

    def loss(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """BPR loss + reg_weight * EmbLoss over the batch's embeddings."""
        return _BPRObjective.apply(
            self.user_embedding.weight,
            self.item_embedding.weight,
            users,
            pos,
            neg,
            self.config.reg_weight,
        )

    def score(self, users: torch.Tensor) -> torch.Tensor:
        """Inner products with every item, [B, n_items]."""
        return self.user_embedding(users) @ self.item_embedding.weight.T
