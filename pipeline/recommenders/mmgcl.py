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
both (the reference needs both). Propagated embeddings are cached while in eval mode. A
training step projects the features once, propagates view 2 beside the main graph (they differ
in the masked channel's item inputs alone; the user-side part all channels share goes once),
and stops every propagation and read-out at the rows the loss reads: the same sums as the
full passes, with the random draws in the reference's order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.data.interactions import InteractionData
from pipeline.recommenders import register_recommender
from pipeline.recommenders._channels import ChannelConfig, ChannelRecommender
from pipeline.recommenders.base import ItemFeatures
from pipeline.recommenders.graph import sym_normalize, to_csr
from pipeline.recommenders.losses import bpr_loss, info_nce, l2_reg


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
        users, items = data.train_users, data.train_items
        self.register_buffer("edge_users", torch.from_numpy(users), persistent=False)
        self.register_buffer("edge_items", torch.from_numpy(items), persistent=False)
        # the edges in the order of the graph blocks' CSR entries (user -> item, item -> user)
        for name, order in (("by_user", (items, users)), ("by_item", (users, items))):
            self.register_buffer(name, torch.from_numpy(np.lexsort(order)), persistent=False)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Final (users [U, d], items [I, d]) of the un-augmented graph."""
        return self.read(*self.propagate_channels(torch.cat(self.item_channels(), dim=1)))

    def edge_dropped_blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalised train graph after dropping each edge with prob. ``dropout_rate``, as
        its user -> item and item -> user blocks (CSR). Built from the kept edges in block order,
        no sort: the same values and entry order as normalising and splitting the kept graph."""
        keep = torch.rand(self.edge_users.shape[0], device=self.edge_users.device)
        keep = keep >= self.config.dropout_rate
        n_users, n_items = self.n_users, self.n_items
        ends = torch.cat([self.edge_users[keep], self.edge_items[keep] + n_users])
        degree = torch.bincount(ends, minlength=n_users + n_items).float()
        inv_sqrt = torch.where(
            degree > 0, degree.clamp(min=1e-12).rsqrt(), torch.zeros_like(degree)
        )
        blocks = []
        for order, rows, cols, shape, row_offset, col_offset in (
            (self.by_user, self.edge_users, self.edge_items, (n_users, n_items), 0, n_users),
            (self.by_item, self.edge_items, self.edge_users, (n_items, n_users), n_users, 0),
        ):
            kept = order[keep[order]]
            row, col = rows[kept], cols[kept]
            crow = torch.zeros(shape[0] + 1, dtype=torch.int64, device=row.device)
            torch.cumsum(torch.bincount(row, minlength=shape[0]), 0, out=crow[1:])
            values = inv_sqrt[row + row_offset] * inv_sqrt[col + col_offset]
            blocks.append(torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False))
        return blocks[0], blocks[1]

    def edge_dropped_adjacency(self) -> torch.Tensor:
        """The same edge-dropped graph as ``edge_dropped_blocks`` (same random draw), whole:
        [(U + I), (U + I)] CSR, normalised as one matrix (the reference the blocks equal)."""
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

    def _draw_views(
        self, channels: list[torch.Tensor]
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], int, torch.Tensor]:
        """The random parts of the two views, in the reference's order: the edge-dropped graph
        (view 1), the masked channel's index and its random item inputs of the same scale
        (view 2)."""
        graph = self.edge_dropped_blocks()
        masked = 1 + self.modalities.index(self.masked_modality())
        random = torch.randn_like(channels[masked]) * channels[masked].detach().std()
        return graph, masked, random

    def _view_channels(
        self, users: torch.Tensor, items: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """Channel stacks of ``users`` and ``items`` in the edge-dropout view and the
        modality-masking view: ((users [n, C, d], items [m, C, d]), (same for view 2))."""
        channels = self.item_channels()
        graph, masked, random = self._draw_views(channels)
        first = self.propagate_channels(torch.cat(channels, dim=1), users, items, graph)
        channels[masked] = random
        return first, self.propagate_channels(torch.cat(channels, dim=1), users, items)

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

    def _contrast(
        self,
        first: tuple[torch.Tensor, torch.Tensor],
        second: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """InfoNCE between the two views' channel stacks, for the users plus the items."""
        total = torch.zeros((), device=first[0].device)
        for read, one, two in (
            (self.user_readout, first[0], second[0]),
            (self.item_readout, first[1], second[1]),
        ):
            hard = self._swap_modality(two) if self.config.hard_negatives else None
            total = total + info_nce(
                read(one.flatten(1)),
                read(two.flatten(1)),
                self.config.ssl_temp,
                None if hard is None else read(hard.flatten(1)),
            )
        return total

    def ssl_loss(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """InfoNCE between the two views, for the unique ``users`` plus the unique ``items``."""
        return self._contrast(*self._view_channels(users.unique(), items.unique()))

    def loss(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """BPR on the final embeddings + ssl_weight * SSL + reg_weight * EmbLoss (ID layer).

        One pass serves the loss and view 2: the feature projections run once, the main graph
        propagates the channels plus view 2's one masked channel side by side (the views share
        the rest), and every propagation and read-out stops at the rows the loss reads. Random
        draws as ``ssl_loss``."""
        channels = self.item_channels()
        c, ssl = self.n_channels, self.config.ssl_weight > 0
        if ssl:
            graph, masked, random = self._draw_views(channels)
        inputs = torch.cat([*channels, random] if ssl else channels, dim=1)
        user_rows, user_at = users.unique(return_inverse=True)
        item_rows, item_at = torch.cat([pos, neg]).unique(return_inverse=True)
        user_ch, item_ch = self.propagate_channels(inputs, user_rows, item_rows)
        user_final, item_final = self.read(user_ch[:, :c], item_ch[:, :c])
        u = user_final[user_at]  # [B, d] each
        p, n = item_final[item_at[: len(pos)]], item_final[item_at[len(pos) :]]
        ranking = bpr_loss((u * p).sum(dim=1), (u * n).sum(dim=1))
        ego = (self.user_embedding[users], self.item_embedding[pos], self.item_embedding[neg])
        total = ranking + self.config.reg_weight * l2_reg(*ego)
        if ssl:
            pos_rows = torch.searchsorted(item_rows, pos.unique())
            view = list(range(c))
            view[masked] = c
            second = (user_ch[:, view], item_ch[pos_rows][:, view])
            first = self.propagate_channels(
                torch.cat(channels, dim=1), user_rows, item_rows[pos_rows], graph
            )
            total = total + self.config.ssl_weight * self._contrast(first, second)
        return total
