"""BPR: matrix factorisation trained with the BPR loss, ID embeddings only.

Rendle et al., "BPR: Bayesian Personalized Ranking from Implicit Feedback", UAI 2009.
Follows MMRec's ``src/models/bpr.py``: user and item ``nn.Embedding`` with Xavier-normal
init, inner-product score, loss = BPR + reg_weight * EmbLoss(u, pos, neg).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.data.interactions import InteractionData
from pipeline.recommenders import register_recommender
from pipeline.recommenders.base import EmbeddingConfig, ItemFeatures, Recommender
from pipeline.recommenders.losses import bpr_loss, l2_reg


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
        u = self.user_embedding(users)  # [B, d]
        p = self.item_embedding(pos)  # [B, d]
        n = self.item_embedding(neg)  # [B, d]
        ranking = bpr_loss((u * p).sum(dim=1), (u * n).sum(dim=1))
        return ranking + self.config.reg_weight * l2_reg(u, p, n)

    def score(self, users: torch.Tensor) -> torch.Tensor:
        """Inner products with every item, [B, n_items]."""
        return self.user_embedding(users) @ self.item_embedding.weight.T
