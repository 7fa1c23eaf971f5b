"""SLMRec: multi-modal LightGCN trained with in-batch InfoNCE plus a self-supervised task.

Tao, Liu, Xia, Wang, Yang, Hu & Chua, "Self-supervised Learning for Multimedia
Recommendation", IEEE Transactions on Multimedia 2022. Follows MMRec's ``src/models/slmrec.py``
(the version the LMM4Rec study ran, with its ``SLMRec_ete.yaml``):

- one channel per modality: ID item embeddings, and each present feature modality projected
  by a linear layer from its L2-normalised features (Xavier-uniform); all channels share the
  user ID embedding and are propagated by LightGCN (mean of layers 0..L) over the train graph;
  users and items are read out by one linear layer each from the concatenated channels;
- main loss (``main_loss="infonce"``, MMRec's): InfoNCE between the batch's users and their
  positive items (cosine, temperature ``main_temp``, the other positives as negatives);
  ``main_loss="bpr"`` uses BPR with the sampled negatives instead;
- loss = main + ssl_weight * SSL + reg_weight * EmbLoss of the batch's ID embeddings (MMRec's
  SLMRec has no embedding loss but Adam weight decay 1e-4, which the shared trainer does not
  use);
- SSL tasks (``ssl_task``): ``fac`` (MMRec's default), fine and coarse-grained alignment: the
  ID channel of the batch's items is projected and contrasted with the image channel, then
  that projection is projected again (to half the width) and contrasted with the text channel
  (un-normalised InfoNCE, temperature ``ssl_temp``); ``fd``, feature dropout: two views whose
  propagated layers go through dropout (``dropout_rate``); ``fm``, feature masking: two views
  that each zero the item inputs of a different channel (ID included); ``fd+fm``: both. The
  two views are contrasted by InfoNCE for users and for items (cosine, ``ssl_temp``).

Departs from MMRec in: the SSL terms use the batch's unique users and items (MMRec keeps
duplicates, which then count as each other's negatives); the FAC chain has one projection
per modality step (MMRec keeps a second one for the absent audio step, a linear map composed
with the next, so no more expressive); feature masking draws its two channels from the
present ones (MMRec draws from four slots, one the absent audio, so a view may go unmasked);
it runs with image only, text only or both (MMRec needs both); propagated embeddings are
cached while in eval mode; the loss propagates (the user-side part the channels share once) and
reads out only the batch's rows, the same sums as MMRec's full pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.data.interactions import InteractionData
from pipeline.recommenders import register_recommender
from pipeline.recommenders._channels import ChannelConfig, ChannelRecommender
from pipeline.recommenders.base import ItemFeatures
from pipeline.recommenders.graph import propagate
from pipeline.recommenders.losses import bpr_loss, info_nce, l2_reg

SSL_TASKS = ("fac", "fd", "fm", "fd+fm")
MAIN_LOSSES = ("infonce", "bpr")


@dataclass(frozen=True)
class SLMRecConfig(ChannelConfig):
    """SLMRec hyperparameters (defaults: the LMM4Rec authors' SLMRec_ete.yaml, ssl_weight and
    ssl_temp picked on the demo's validation split from its grids)."""

    embedding_size: int = 128  # recdim in LMM4Rec's SLMRec_ete.yaml (MMRec's default is 64)
    n_layers: int = 3  # layer_num
    ssl_task: str = "fac"  # fac | fd | fm | fd+fm
    ssl_weight: float = 0.05  # ssl_alpha; grid {0.01, 0.05, 0.1} (demo: all within 0.001)
    ssl_temp: float = 0.2  # grid {0.1, 0.2, 0.5} (demo: all within 0.003)
    main_loss: str = "infonce"  # infonce (MMRec) | bpr
    main_temp: float = 0.2  # temp: the main InfoNCE's temperature
    dropout_rate: float = 0.3  # feature dropout of the fd and fd+fm views

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ssl_task not in SSL_TASKS:
            raise ValueError(f"ssl_task = {self.ssl_task!r}; allowed: {list(SSL_TASKS)}")
        if self.main_loss not in MAIN_LOSSES:
            raise ValueError(f"main_loss = {self.main_loss!r}; allowed: {list(MAIN_LOSSES)}")
        if not self.main_temp > 0:
            raise ValueError(f"main_temp = {self.main_temp}; use a positive temperature")


@register_recommender("slmrec")
class SLMRec(ChannelRecommender):
    """Per-modality LightGCN channels read out to one embedding; score = inner product."""

    config_class = SLMRecConfig

    def __init__(self, data: InteractionData, features: ItemFeatures, config: SLMRecConfig):
        super().__init__(data, features, config)
        if config.ssl_task == "fac":
            # step k: the chain so far -> width_k, against modality k's channel -> width_k
            d = config.embedding_size
            widths = [d] + [max(1, d // 2)] * (len(self.modalities) - 1)
            self.fac_chain = nn.ModuleList(
                nn.Linear(d if k == 0 else widths[k - 1], w) for k, w in enumerate(widths)
            )
            self.fac_modality = nn.ModuleList(nn.Linear(d, w) for w in widths)
            for layer in (*self.fac_chain, *self.fac_modality):
                nn.init.xavier_uniform_(layer.weight)

    def _inputs(self, masked: int | None = None) -> torch.Tensor:
        """Layer-0 embeddings of all channels, [U + I, C * d]; item inputs of channel
        ``masked`` (0 = ID, then the modalities in order) are zeroed."""
        items = self.item_channels()
        if masked is not None:
            items[masked] = torch.zeros_like(items[masked])
        return self.stack(items)

    def _channels(
        self, inputs: torch.Tensor, dropout: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Propagated channels of ``inputs`` [U + I, k * C * d]: users [U, k * C, d] and
        items [I, k * C, d]."""
        out = propagate(self.adjacency, inputs, self.config.n_layers, dropout)
        out = out.view(out.shape[0], -1, self.config.embedding_size)
        return out[: self.n_users], out[self.n_users :]

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Final (users [U, d], items [I, d]) of the un-augmented graph."""
        return self.read(*self.propagate_channels(torch.cat(self.item_channels(), dim=1)))

    def fac_loss(self, item_channels: torch.Tensor) -> torch.Tensor:
        """Fine-and-coarse alignment of the items' channels [m, C, d]: the projected ID channel
        against each modality in turn, the chain projected further at every step."""
        chain, total = item_channels[:, 0], item_channels.new_zeros(())
        for k in range(len(self.modalities)):
            chain = self.fac_chain[k](chain)
            target = self.fac_modality[k](item_channels[:, k + 1])
            total = total + info_nce(chain, target, self.config.ssl_temp, normalize=False)
        return total

    def views(
        self, users: torch.Tensor, items: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """Final embeddings of ``users`` and ``items`` in two augmented views (``fd``, ``fm``
        or ``fd+fm``): ((users [n, d], items [m, d]), (same for view 2))."""
        task = self.config.ssl_task
        if task == "fac":
            raise ValueError("ssl_task 'fac' contrasts channels, not augmented views")
        masks: list[int | None] = [None, None]
        if "fm" in task:
            c1 = int(torch.randint(self.n_channels, ()))
            masks = [c1, (c1 + int(torch.randint(1, self.n_channels, ()))) % self.n_channels]
        dropout = self.config.dropout_rate if "fd" in task else 0.0
        inputs = torch.cat([self._inputs(m) for m in masks], dim=1)  # both views side by side
        user_ch, item_ch = self._channels(inputs, dropout)  # [*, 2C, d]
        c = self.n_channels
        first = self.read(user_ch[users, :c], item_ch[items, :c])
        second = self.read(user_ch[users, c:], item_ch[items, c:])
        return first, second

    def ssl_loss(
        self, users: torch.Tensor, items: torch.Tensor, item_channels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The SSL task on the unique ``users`` and ``items``; ``fac`` reads ``item_channels``
        [m, C, d], the un-augmented channels of the unique items (computed if None)."""
        users, items = users.unique(), items.unique()
        if self.config.ssl_task == "fac":
            if item_channels is None:
                inputs = torch.cat(self.item_channels(), dim=1)
                item_channels = self.propagate_channels(inputs, users, items)[1]
            return self.fac_loss(item_channels)
        (u1, i1), (u2, i2) = self.views(users, items)
        temp = self.config.ssl_temp
        return info_nce(u1, u2, temp) + info_nce(i1, i2, temp)

    def loss(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """Main loss (InfoNCE or BPR) + ssl_weight * SSL + reg_weight * EmbLoss (ID layer).
        Propagated and read out at the batch's rows only: the loss reads no other."""
        infonce = self.config.main_loss == "infonce"
        user_rows, user_at = users.unique(return_inverse=True)
        item_rows, item_at = (pos if infonce else torch.cat([pos, neg])).unique(return_inverse=True)
        inputs = torch.cat(self.item_channels(), dim=1)
        user_ch, item_ch = self.propagate_channels(inputs, user_rows, item_rows)
        user_final, item_final = self.read(user_ch, item_ch)
        u, p = user_final[user_at], item_final[item_at[: len(pos)]]  # [B, d]
        if infonce:
            main = info_nce(u, p, self.config.main_temp)
        else:
            n = item_final[item_at[len(pos) :]]
            main = bpr_loss((u * p).sum(dim=1), (u * n).sum(dim=1))
        ego = (self.user_embedding[users], self.item_embedding[pos], self.item_embedding[neg])
        total = main + self.config.reg_weight * l2_reg(*ego)
        if self.config.ssl_weight > 0:
            if not infonce and self.config.ssl_task == "fac":  # the positives' rows
                item_ch = item_ch[torch.searchsorted(item_rows, pos.unique())]
            total = total + self.config.ssl_weight * self.ssl_loss(users, pos, item_ch)
        return total
