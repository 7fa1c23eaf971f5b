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
The propagation is one autograd node (``pipeline.recommenders.graph.smooth``) that writes
its sparse products into buffers reused from step to step, with the float operations of the
layer-by-layer graph; in training it returns only the batch's rows (``smooth_rows``), whose
gradients are scattered into one table before the backward products.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.data.interactions import InteractionData
from pipeline.recommenders import register_recommender
from pipeline.recommenders.base import EmbeddingConfig, GraphRecommender, ItemFeatures
from pipeline.recommenders.graph import compact_csr, normalized_adjacency, smooth, smooth_rows
from pipeline.recommenders.losses import bpr_loss, l2_reg


@dataclass(frozen=True)
class LightGCNConfig(EmbeddingConfig):
    """LightGCN hyperparameters (MMRec's LightGCN.yaml: embedding 64; n_layers and reg_weight
    from its grid, at the LightGCN paper's choice)."""

    n_layers: int = 3  # propagation steps; the paper's choice, in MMRec's grid {1, 2, 3, 4}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_layers < 0:
            raise ValueError(f"n_layers = {self.n_layers}; use a value >= 0")


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
        final, ego = smooth_rows(
            self.user_embedding,
            self.item_embedding,
            self.adjacency,
            self.config.n_layers,
            self._scratch,
            (users, pos, neg),
        )
        u, p, n = final.chunk(3)  # [B, d] each
        ranking = bpr_loss((u * p).sum(dim=1), (u * n).sum(dim=1))
        return ranking + self.config.reg_weight * l2_reg(*ego.chunk(3))

    def score(self, users: torch.Tensor) -> torch.Tensor:
        """Inner products of the propagated embeddings with every item, [B, n_items]."""
        user_all, item_all = self.propagated()
        return user_all[users] @ item_all.T
