"""VBPR: BPR with item representations that include a projection of the item's content.

He & McAuley, "VBPR: Visual Bayesian Personalized Ranking from Implicit Feedback", AAAI 2016.
Follows MMRec's ``src/models/vbpr.py`` (the version the LMM4Rec study ran): text and image
features are concatenated (text first) and projected by one linear layer to the embedding
size; an item is [ID embedding ; projected features] (2d), a user one 2d embedding; score =
inner product; loss = BPR + reg_weight * EmbLoss(u, pos, neg). ID embeddings use
Xavier-uniform init, the projection Xavier-normal with zero bias, as in MMRec. The features
stay fixed (a buffer, not saved in the checkpoint).
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
class VBPRConfig(EmbeddingConfig):
    """VBPR hyperparameters (defaults: the LMM4Rec authors' VBPR.yaml)."""

    embedding_size: int = 128  # LMM4Rec's VBPR.yaml (MMRec's default is 64)


@register_recommender("vbpr")
class VBPR(Recommender):
    """score(u, i) = <theta_u, [gamma_i ; W f_i + b]> with f_i the item's content features."""

    uses_features = True
    config_class = VBPRConfig

    def __init__(self, data: InteractionData, features: ItemFeatures | None, config: VBPRConfig):
        super().__init__(data, features, config)
        if features is None:
            raise ValueError("vbpr uses item features, but none were given")
        d = config.embedding_size
        self.register_buffer("item_features", features.concat(), persistent=False)  # [N, F]
        self.user_embedding = nn.Parameter(torch.empty(self.n_users, 2 * d))
        self.item_embedding = nn.Parameter(torch.empty(self.n_items, d))
        self.item_linear = nn.Linear(self.item_features.shape[1], d)
        nn.init.xavier_uniform_(self.user_embedding)
        nn.init.xavier_uniform_(self.item_embedding)
        nn.init.xavier_normal_(self.item_linear.weight)
        nn.init.zeros_(self.item_linear.bias)
        self.modalities = tuple(m for m in ("image", "text") if getattr(features, m) is not None)

    def set_item_features(self, features: ItemFeatures) -> None:
        """Read ``features`` (concatenated, text first) from now on."""
        self.check_features(features, self.modalities)
        self.item_features = features.concat()

    def item_representation(self, items: torch.Tensor | None = None) -> torch.Tensor:
        """[ID embedding ; projected features] of ``items`` (all items if None), [*, 2d]."""
        if items is None:
            return torch.cat([self.item_embedding, self.item_linear(self.item_features)], dim=1)
        content = self.item_linear(self.item_features.index_select(0, items))
        return torch.cat([self.item_embedding.index_select(0, items), content], dim=1)

    def loss(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """BPR loss + reg_weight * EmbLoss over the batch's user and item representations.

        Each distinct item of the batch is projected once (an item drawn as several positives
        and negatives shares its row), so the step's largest product covers the distinct
        items only."""
        u = self.user_embedding[users]  # [B, 2d]
        items, where = torch.unique(torch.cat([pos, neg]), return_inverse=True)
        p, n = self.item_representation(items)[where].split(len(pos))  # [B, 2d] each
        ranking = bpr_loss((u * p).sum(dim=1), (u * n).sum(dim=1))
        return ranking + self.config.reg_weight * l2_reg(u, p, n)

    def score(self, users: torch.Tensor) -> torch.Tensor:
        """Inner products with every item's representation, [B, n_items]."""
        return self.user_embedding[users] @ self.item_representation().T
