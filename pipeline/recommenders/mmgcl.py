"""MMGCL: multi-modal LightGCN with a contrastive loss between two augmented graph views.

Yi, Wang, Ounis & Macdonald, "Multi-modal Graph Contrastive Learning for Micro-video
Recommendation", SIGIR 2022. MMRec has no MMGCL; this follows the authors' own code in the
LMM4Rec repository (zxy-ml84/LMM4Rec ``models/mmgcl.py``, ``configs/model/MMGCL.yaml``):

- one channel per modality: ID item embeddings, and each present feature modality projected
  by a linear layer from its L2-normalised features (Xavier-uniform); all channels share the
  user ID embedding and are propagated by LightGCN (mean of layers 0..L) over the train graph;
  users and items are read out by one linear layer each from the concatenated channels;
- loss = BPR on the read-out embeddings + ssl_weight * SSL + reg_weight * EmbLoss of the
  batch's ID embeddings (the reference has no embedding loss but Adam weight decay 1e-4, which
  the shared trainer does not use);
- view 1, modality edge dropout: every channel propagated over one graph that keeps each train
  edge with probability 1 - dropout_rate; view 2, modality masking: one feature modality
  (image with probability ``mask_image_p``, else text) has its item inputs replaced by random
  embeddings, as the paper describes;
- SSL: InfoNCE between the two views of the batch's (unique) users and of its (unique)
  positive items, L2-normalised, temperature ``ssl_temp``, in-batch negatives, plus the paper's
  negative sampling: one hard negative per anchor, its view-2 embedding with one random
  feature modality swapped for another batch node's.

Departs from the reference where the reference contradicts the paper: its two InfoNCE terms
both contrast users with their positive items inside view 1 (view 2 and its hard negatives are
computed but unused), its "modality masking" drops nodes of the masked modality's graph, and
its text-masking branch swaps the image and text inputs. Runs with image only, text only or
both (the reference needs both). Propagated embeddings are cached while in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.graph import propagate, sym_normalize, to_csr
from pipeline.interactions import InteractionData
from pipeline.losses import bpr_loss, l2_reg
from pipeline.recommenders import register_recommender
from pipeline.recommenders._channels import ChannelConfig, ChannelRecommender
from pipeline.recommenders.base import ItemFeatures


def info_nce(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    temperature: float,
    hard: torch.Tensor | None = None,
    normalize: bool = True,
) -> torch.Tensor:
    """InfoNCE, mean over anchors: row i of ``positive`` [n, d] is anchor i's positive, the
    other rows its negatives; ``hard`` [n, d] adds one more negative per anchor. Rows are
    L2-normalised first (cosine similarity) unless ``normalize`` is False."""
    if normalize:
        anchor, positive = F.normalize(anchor, dim=1), F.normalize(positive, dim=1)
    logits = anchor @ positive.T  # [n, n]
    if hard is not None:
        hard = F.normalize(hard, dim=1) if normalize else hard
        logits = torch.cat([logits, (anchor * hard).sum(dim=1, keepdim=True)], dim=1)
    labels = torch.arange(anchor.shape[0], device=anchor.device)
    return F.cross_entropy(logits / temperature, labels)


@dataclass(frozen=True)
class MMGCLConfig(ChannelConfig):
    """MMGCL hyperparameters (defaults: the LMM4Rec authors' MMGCL.yaml, ssl_weight and
    ssl_temp picked on the demo's validation split from its grids)."""

    n_layers: int = 3  # layer_num
    ssl_weight: float = 0.1  # ssl_alpha; grid {0.1, 0.2, ..., 1.0} (demo: 0.2 ties, 0.5 worse)
    ssl_temp: float = 0.2  # grid {0.1, 0.2, 0.5, 1.0} (demo: 0.1 and 0.5 worse)
    dropout_rate: float = 0.3  # share of train edges dropped in the edge-dropout view
    mask_image_p: float = 0.1  # mask_p [0.1, 0.9]: P(mask image), else text, when both exist
    hard_negatives: bool = True  # the paper's modality-swapped negative per anchor

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.mask_image_p <= 1:
            raise ValueError(f"mask_image_p = {self.mask_image_p}; use a value in [0, 1]")


@register_recommender("mmgcl")
class MMGCL(ChannelRecommender):
    """Per-modality LightGCN channels read out to one embedding; score = inner product."""

    config_class = MMGCLConfig

    def __init__(self, data: InteractionData, features: ItemFeatures, config: MMGCLConfig):
        super().__init__(data, features, config)
        self.register_buffer("edge_users", torch.from_numpy(data.train_users), persistent=False)
        self.register_buffer("edge_items", torch.from_numpy(data.train_items), persistent=False)

    def _inputs(self, masked: str | None = None) -> torch.Tensor:
        """Layer-0 embeddings of all channels, [U + I, C * d]; the ``masked`` modality's item
        inputs are replaced by random embeddings of the same scale."""
        items = self.item_channels()
        for k, name in enumerate(self.modalities, start=1):
            if name == masked:
                items[k] = torch.randn_like(items[k]) * items[k].detach().std()
        return self.stack(items)

    def _channels(
        self, adjacency: torch.Tensor, masked: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Propagated channels over ``adjacency``: (users [U, C, d], items [I, C, d])."""
        out = propagate(adjacency, self._inputs(masked), self.config.n_layers)
        out = out.view(-1, self.n_channels, self.config.embedding_size)
        return out[: self.n_users], out[self.n_users :]

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Final (users [U, d], items [I, d]) of the un-augmented graph."""
        return self.read(*self._channels(self.adjacency))

    def edge_dropped_adjacency(self) -> torch.Tensor:
        """The normalised train graph after dropping each edge with prob. ``dropout_rate``."""
        keep = torch.rand(self.edge_users.shape[0], device=self.edge_users.device)
        keep = keep >= self.config.dropout_rate
        users, items = self.edge_users[keep], self.edge_items[keep] + self.n_users
        index = torch.cat([torch.stack([users, items]), torch.stack([items, users])], dim=1)
        values = torch.ones(index.shape[1], device=index.device)
        return to_csr(sym_normalize(index, values, self.n_users + self.n_items))

    def masked_modality(self) -> str:
        """The modality masked in view 2: image with prob. ``mask_image_p`` when both exist."""
        if len(self.modalities) == 1:
            return self.modalities[0]
        return "image" if torch.rand(()).item() < self.config.mask_image_p else "text"

    def _view_channels(
        self, users: torch.Tensor, items: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """Channel stacks of ``users`` and ``items`` in the edge-dropout view and the
        modality-masking view: ((users [n, C, d], items [m, C, d]), (same for view 2))."""
        u1, i1 = self._channels(self.edge_dropped_adjacency())
        u2, i2 = self._channels(self.adjacency, masked=self.masked_modality())
        return (u1[users], i1[items]), (u2[users], i2[items])

    def views(
        self, users: torch.Tensor, items: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """Final embeddings of ``users`` and ``items`` in the edge-dropout view and the
        modality-masking view: ((users [n, d], items [m, d]), (same for view 2))."""
        first, second = self._view_channels(users, items)
        return self.read(*first), self.read(*second)

    def _swap_modality(self, channels: torch.Tensor) -> torch.Tensor | None:
        """Hard negatives [n, C, d]: each row with one random feature channel taken from
        another row (None when there is a single row)."""
        n = channels.shape[0]
        if n < 2:
            return None
        rows = torch.arange(n, device=channels.device)
        partner = (rows + torch.randint(1, n, (n,), device=channels.device)) % n
        channel = torch.randint(1, self.n_channels, (n,), device=channels.device)
        swapped = channels.clone()
        swapped[rows, channel] = channels[partner, channel]
        return swapped

    def ssl_loss(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """InfoNCE between the two views, for the unique ``users`` plus the unique ``items``."""
        (u1, i1), (u2, i2) = self._view_channels(users.unique(), items.unique())
        total = torch.zeros((), device=u1.device)
        for read, first, second in ((self.user_readout, u1, u2), (self.item_readout, i1, i2)):
            hard = self._swap_modality(second) if self.config.hard_negatives else None
            total = total + info_nce(
                read(first.flatten(1)),
                read(second.flatten(1)),
                self.config.ssl_temp,
                None if hard is None else read(hard.flatten(1)),
            )
        return total

    def loss(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """BPR on the final embeddings + ssl_weight * SSL + reg_weight * EmbLoss (ID layer)."""
        user_all, item_all = self.forward()
        u, p, n = user_all[users], item_all[pos], item_all[neg]  # [B, d] each
        ranking = bpr_loss((u * p).sum(dim=1), (u * n).sum(dim=1))
        ego = (self.user_embedding[users], self.item_embedding[pos], self.item_embedding[neg])
        total = ranking + self.config.reg_weight * l2_reg(*ego)
        if self.config.ssl_weight > 0:
            total = total + self.config.ssl_weight * self.ssl_loss(users, pos)
        return total
