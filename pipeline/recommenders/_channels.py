"""The skeleton MMGCL and SLMRec share: an ID channel plus one projected channel per modality,
propagated together by LightGCN over the train graph and read out to one embedding."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.interactions import InteractionData
from pipeline.recommenders.base import EmbeddingConfig, GraphRecommender, ItemFeatures
from pipeline.recommenders.graph import (
    bipartite_blocks,
    compact_csr,
    normalized_adjacency,
    propagate_bipartite,
)

MODALITIES = ("image", "text")


@dataclass(frozen=True)
class ChannelConfig(EmbeddingConfig):
    """The knobs MMGCL and SLMRec share: LightGCN depth, the self-supervised loss's weight and
    temperature, and the dropout rate of their augmented views."""

    n_layers: int = 3  # layer_num
    ssl_weight: float = 0.1  # ssl_alpha
    ssl_temp: float = 0.2
    dropout_rate: float = 0.3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_layers < 0:
            raise ValueError(f"n_layers = {self.n_layers}; use a value >= 0")
        if self.ssl_weight < 0:
            raise ValueError(f"ssl_weight = {self.ssl_weight}; use a value >= 0")
        if not self.ssl_temp > 0:
            raise ValueError(f"ssl_temp = {self.ssl_temp}; use a positive temperature")
        if not 0 <= self.dropout_rate < 1:
            raise ValueError(f"dropout_rate = {self.dropout_rate}; use a value in [0, 1)")


class ChannelRecommender(GraphRecommender):
    """User/item ID embeddings [*, d], per-modality linear projections of the L2-normalised
    features to d, the normalised train graph, and linear read-outs of the C = 1 + modalities
    channels [*, C * d] -> [*, d]; score = inner product of the read-outs."""

    uses_features = True

    def __init__(self, data: InteractionData, features: ItemFeatures, config: EmbeddingConfig):
        super().__init__(data, features, config)
        d = config.embedding_size
        self.modalities = tuple(m for m in MODALITIES if getattr(features, m) is not None)
        self.user_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_users, d)))
        self.item_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_items, d)))
        self.projections = nn.ModuleDict()
        for name in self.modalities:
            feats = F.normalize(getattr(features, name).float(), dim=1)
            self.register_buffer(f"{name}_features", feats, persistent=False)
            self.projections[name] = nn.Linear(feats.shape[1], d)
        self.user_readout = nn.Linear(self.n_channels * d, d)
        self.item_readout = nn.Linear(self.n_channels * d, d)
        for layer in (*self.projections.values(), self.user_readout, self.item_readout):
            nn.init.xavier_uniform_(layer.weight)
        adjacency = normalized_adjacency(data)
        self.register_buffer("adjacency", compact_csr(adjacency), persistent=False)
        user_items, item_users = bipartite_blocks(adjacency, self.n_users)
        self.register_buffer("user_items", user_items, persistent=False)
        self.register_buffer("item_users", item_users, persistent=False)

    def set_item_features(self, features: ItemFeatures) -> None:
        """Read ``features`` (L2-normalised) from now on."""
        self.check_features(features, self.modalities)
        for name in self.modalities:
            setattr(self, f"{name}_features", F.normalize(getattr(features, name).float(), dim=1))
        self.forget()

    @property
    def n_channels(self) -> int:
        """ID channel + one per present modality."""
        return 1 + len(self.modalities)

    def item_channels(self) -> list[torch.Tensor]:
        """Layer-0 item inputs per channel: the ID embeddings, then each modality's [I, d]."""
        return [
            self.item_embedding,
            *(self.projections[m](getattr(self, f"{m}_features")) for m in self.modalities),
        ]

    def propagate_channels(
        self,
        items: torch.Tensor,
        user_rows: torch.Tensor | None = None,
        item_rows: torch.Tensor | None = None,
        graph: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """LightGCN of K channels that share the user ID embeddings, from item inputs
        [I, K * d], over the train graph (or ``graph``'s user -> item and item -> user blocks):
        (users [U, K, d], items [I, K, d]), or only ``user_rows`` / ``item_rows``. The same
        sums as propagating ``stack`` over the whole graph, for a fraction of the work."""
        user_items, item_users = graph or (self.user_items, self.item_users)
        return propagate_bipartite(
            user_items,
            item_users,
            self.user_embedding,
            items,
            self.config.n_layers,
            user_rows,
            item_rows,
        )

    def stack(self, items: list[torch.Tensor]) -> torch.Tensor:
        """Users' ID embedding repeated per channel over the item channels: [U + I, C * d]."""
        users = self.user_embedding.repeat(1, self.n_channels)
        return torch.cat([users, torch.cat(items, dim=1)], dim=0)

    def read(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Read-out of channel stacks [*, C, d] to final embeddings [*, d]."""
        return self.user_readout(users.flatten(1)), self.item_readout(items.flatten(1))

    def score(self, users: torch.Tensor) -> torch.Tensor:
        """Inner products of the read-out embeddings with every item, [B, n_items]."""
        user_all, item_all = self.propagated()
        return user_all[users] @ item_all.T
