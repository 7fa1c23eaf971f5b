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

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.graph import normalized_adjacency, sym_normalize
from pipeline.interactions import InteractionData
from pipeline.losses import bpr_loss, l2_reg
from pipeline.recommenders import register_recommender
from pipeline.recommenders.base import EmbeddingConfig, ItemFeatures, Recommender

MODALITIES = ("image", "text")


class _SymmetricSpMM(torch.autograd.Function):
    """A @ x for a constant symmetric sparse A, whose backward is A @ grad (no transpose)."""

    @staticmethod
    def forward(ctx, adjacency: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.adjacency = adjacency
        return torch.sparse.mm(adjacency, x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, torch.sparse.mm(ctx.adjacency, grad)


def to_csr(adjacency: torch.Tensor) -> torch.Tensor:
    """The sparse matrix in CSR layout, which multiplies 2-4x faster than COO on CPU (torch's
    "CSR support is in beta" warning silenced)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return adjacency.to_sparse_csr()


def propagate(
    adjacency: torch.Tensor, ego: torch.Tensor, n_layers: int, dropout: float = 0.0
) -> torch.Tensor:
    """LightGCN smoothing: the mean of ``ego`` [N, D] and its ``n_layers`` propagations by the
    symmetric sparse ``adjacency`` [N, N]; ``dropout`` > 0 drops entries of every propagated
    layer (SLMRec's feature dropout), the dropped layer feeding the next one."""
    layer, total = ego, ego
    for _ in range(n_layers):
        layer = _SymmetricSpMM.apply(adjacency, layer)
        if dropout > 0:
            layer = F.dropout(layer, dropout, training=True)
        total = total + layer
    return total / (n_layers + 1)


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
class MMGCLConfig(EmbeddingConfig):
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
        if self.n_layers < 0:
            raise ValueError(f"n_layers = {self.n_layers}; use a value >= 0")
        if self.ssl_weight < 0:
            raise ValueError(f"ssl_weight = {self.ssl_weight}; use a value >= 0")
        if not self.ssl_temp > 0:
            raise ValueError(f"ssl_temp = {self.ssl_temp}; use a positive temperature")
        if not 0 <= self.dropout_rate < 1:
            raise ValueError(f"dropout_rate = {self.dropout_rate}; use a value in [0, 1)")
        if not 0 <= self.mask_image_p <= 1:
            raise ValueError(f"mask_image_p = {self.mask_image_p}; use a value in [0, 1]")


@register_recommender("mmgcl")
class MMGCL(Recommender):
    """Per-modality LightGCN channels read out to one embedding; score = inner product."""

    uses_features = True
    config_class = MMGCLConfig

    def __init__(self, data: InteractionData, features: ItemFeatures | None, config: MMGCLConfig):
        super().__init__(data, features, config)
        if features is None:
            raise ValueError("mmgcl uses item features, but none were given")
        d = config.embedding_size
        self.modalities = tuple(m for m in MODALITIES if getattr(features, m) is not None)
        self.user_embedding = nn.Parameter(torch.empty(self.n_users, d))
        self.item_embedding = nn.Parameter(torch.empty(self.n_items, d))
        nn.init.xavier_uniform_(self.user_embedding)
        nn.init.xavier_uniform_(self.item_embedding)
        self.projections = nn.ModuleDict()
        for name in self.modalities:
            feats = F.normalize(getattr(features, name).float(), dim=1)
            self.register_buffer(f"{name}_features", feats, persistent=False)
            self.projections[name] = nn.Linear(feats.shape[1], d)
        width = (1 + len(self.modalities)) * d  # ID channel + one per modality
        self.read_user = nn.Linear(width, d)
        self.read_item = nn.Linear(width, d)
        for layer in (*self.projections.values(), self.read_user, self.read_item):
            nn.init.xavier_uniform_(layer.weight)
        adjacency = to_csr(normalized_adjacency(data))
        self.register_buffer("adjacency", adjacency, persistent=False)
        self.register_buffer("edge_users", torch.from_numpy(data.train_users), persistent=False)
        self.register_buffer("edge_items", torch.from_numpy(data.train_items), persistent=False)
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def n_channels(self) -> int:
        """ID channel + one per present modality."""
        return 1 + len(self.modalities)

    def train(self, mode: bool = True) -> MMGCL:
        """Switch mode and drop the embeddings cached for scoring (the weights may change)."""
        self._cache = None
        return super().train(mode)

    def _inputs(self, masked: str | None = None) -> torch.Tensor:
        """Layer-0 embeddings of all channels, [U + I, C * d]; the ``masked`` modality's item
        inputs are replaced by random embeddings of the same scale."""
        items = [self.item_embedding]
        for name in self.modalities:
            x = self.projections[name](getattr(self, f"{name}_features"))  # [I, d]
            if name == masked:
                x = torch.randn_like(x) * x.detach().std()
            items.append(x)
        users = self.user_embedding.repeat(1, self.n_channels)
        return torch.cat([users, torch.cat(items, dim=1)], dim=0)

    def _channels(
        self, adjacency: torch.Tensor, masked: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Propagated channels over ``adjacency``: (users [U, C, d], items [I, C, d])."""
        out = propagate(adjacency, self._inputs(masked), self.config.n_layers)
        out = out.view(-1, self.n_channels, self.config.embedding_size)
        return out[: self.n_users], out[self.n_users :]

    def _read(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Read-out of channel stacks [*, C, d] to final embeddings [*, d]."""
        return self.read_user(users.flatten(1)), self.read_item(items.flatten(1))

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Final (users [U, d], items [I, d]) of the un-augmented graph."""
        return self._read(*self._channels(self.adjacency))

    def propagated(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward()``, computed once and cached while in eval mode."""
        if self.training:
            return self.forward()
        if self._cache is None:
            with torch.no_grad():
                self._cache = self.forward()
        return self._cache

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
        return self._read(*first), self._read(*second)

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
        for read, first, second in ((self.read_user, u1, u2), (self.read_item, i1, i2)):
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

    def score(self, users: torch.Tensor) -> torch.Tensor:
        """Inner products of the final embeddings with every item, [B, n_items]."""
        user_all, item_all = self.propagated()
        return user_all[users] @ item_all.T
