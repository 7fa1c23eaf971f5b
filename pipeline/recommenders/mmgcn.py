"""MMGCN: one graph convolution network per modality over the user-item graph.

Wei et al., "MMGCN: Multi-modal Graph Convolution Network for Personalized Recommendation of
Micro-video", ACM MM 2019. Follows MMRec's ``src/models/mmgcn.py`` (the version the LMM4Rec
study ran): per modality, node inputs are [user preference ; item features], with image
features first projected by a linear layer to ``image_latent_size`` (text features enter at
their own width), rows L2-normalised. Each of ``n_layers`` layers computes
h = leaky(mean over graph neighbours of x W), x_hat = leaky(Linear(x)) + ID embedding,
x = leaky(Linear([h ; x_hat])) (MMRec, like the authors' code, passes ``concate='False'``, a
non-empty string, so the concatenation branch is the one that runs; ``concat: false`` gives the
additive x = leaky(Linear(h) + x_hat) the flag asked for). The representation is the mean over
the present modalities; score = inner product; loss = BPR + reg_weight * (mean squared ID
embedding of the batch + mean squared user preference).

Departures from MMRec: the user preferences and ID embeddings are trained (MMRec, like the
authors' own code, builds them as plain tensors that never reach the optimiser, so they stay
at their random init and its reg_weight term is a constant; set ``learn_embeddings: false`` to
reproduce that); every modality's preference is regularised (MMRec: only the image one);
``n_layers`` is honoured (MMRec hard-codes three); all weights use Xavier-normal init;
propagation is a sparse D^-1 A product (its transpose precomputed for the backward pass)
instead of torch_geometric, taken before the layer weight ((A x) W, the same product as
A (x W)); in training the last layer, its graph product included, runs only on the batch's
users and items, the only rows the loss reads (same loss, fewer products); the
representation is cached while in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.interactions import InteractionData
from pipeline.recommenders import register_recommender
from pipeline.recommenders.base import EmbeddingConfig, GraphRecommender, ItemFeatures
from pipeline.recommenders.graph import compact_csr, constant_spmm, rows_spmm
from pipeline.recommenders.losses import bpr_loss


@dataclass(frozen=True)
class MMGCNConfig(EmbeddingConfig):
    """MMGCN hyperparameters (defaults: the LMM4Rec authors' MMGCN.yaml and MMRec's code)."""

    embedding_size: int = 128  # LMM4Rec's MMGCN.yaml (MMRec's default is 64)
    reg_weight: float = 1e-3  # LMM4Rec's grid {1e-3, 1e-2, 1e-1}
    n_layers: int = 3  # graph convolution layers per modality (MMRec's code has three)
    image_latent_size: int = 256  # width image features are projected to (MMRec's dim_latent)
    learn_embeddings: bool = True  # False: preferences and ID embeddings frozen, as in MMRec
    concat: bool = True  # combine Linear([h ; x_hat]) (what MMRec runs); False: Linear(h) + x_hat

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_layers < 1:
            raise ValueError(f"n_layers = {self.n_layers}; use at least 1")
        if self.image_latent_size < 1:
            raise ValueError(f"image_latent_size = {self.image_latent_size}; use at least 1")


def mean_adjacency(data: InteractionData) -> tuple[torch.Tensor, torch.Tensor]:
    """The row-normalised user-item train graph D^-1 A [(U + I), (U + I)], users first, and its
    transpose A D^-1 (for the backward pass), both CSR: multiplying by the first averages each
    node's neighbours (torch_geometric's ``aggr='mean'``)."""
    users = torch.from_numpy(data.train_users)
    items = torch.from_numpy(data.train_items) + data.n_users
    index = torch.cat([torch.stack([users, items]), torch.stack([items, users])], dim=1)
    n = data.n_users + data.n_items
    values = 1.0 / torch.bincount(index[0], minlength=n).float()[index[0]]
    coo = torch.sparse_coo_tensor(index, values, (n, n), check_invariants=False).coalesce()
    return compact_csr(coo), compact_csr(coo.t().coalesce())


def _weight(rows: int, cols: int, learn: bool = True) -> nn.Parameter:
    """A Xavier-normal initialised [rows, cols] parameter."""
    return nn.Parameter(nn.init.xavier_normal_(torch.empty(rows, cols)), requires_grad=learn)


class ModalityGCN(nn.Module):
    """The GCN of one modality: [user preference ; item features] -> [(U + I), d]."""

    def __init__(
        self, n_users: int, feature_size: int, latent_size: int | None, config: MMGCNConfig
    ):
        super().__init__()
        d = config.embedding_size
        self.project = None if latent_size is None else nn.Linear(feature_size, latent_size)
        width = feature_size if latent_size is None else latent_size
        self.preference = _weight(n_users, width, config.learn_embeddings)
        widths = [width] + [d] * (config.n_layers - 1)  # input width of each layer
        self.conv = nn.ParameterList(_weight(w, w) for w in widths)
        self.linear = nn.ModuleList(nn.Linear(w, d) for w in widths)
        self.concat = config.concat
        self.combine = nn.ModuleList(nn.Linear(w + d if self.concat else w, d) for w in widths)
        for layer in [self.project, *self.linear, *self.combine]:
            if layer is not None:
                nn.init.xavier_normal_(layer.weight)

    def forward(
        self,
        features: torch.Tensor,
        id_embedding: torch.Tensor,
        adjacency: tuple[torch.Tensor, torch.Tensor],
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Node representations [(U + I), d] from item ``features`` [I, F] and the mean
        ``adjacency`` with its transpose; with ``rows``, only those nodes' [R, d] (the last
        layer's dense products then run on those rows alone)."""
        items = features if self.project is None else self.project(features)
        x = F.normalize(torch.cat([self.preference, items], dim=0))  # [U + I, w]
        last = len(self.conv) - 1
        for layer, (conv, linear, combine) in enumerate(
            zip(self.conv, self.linear, self.combine, strict=True)
        ):
            ids = id_embedding
            if layer == last and rows is not None:  # the graph product of those rows alone
                mean = rows_spmm(adjacency[0], rows, x, adjacency[1])
                x, ids = x[rows], id_embedding[rows]
            else:
                mean = constant_spmm(adjacency[0], x, adjacency[1])  # (A x) W = A (x W)
            # in place where autograd keeps what the backward reads: the same values, without a
            # fresh [nodes, width] buffer per operation (at Elec size each is ~100-400 MB)
            h = F.leaky_relu(mean @ conv, inplace=True)  # the neighbourhood
            x_hat = F.leaky_relu(linear(x)).add_(ids)  # the node itself
            if self.concat:  # combine([h ; x_hat]) without materialising the concatenation
                w = h.shape[1]
                x = F.linear(h, combine.weight[:, :w]).add_(F.linear(x_hat, combine.weight[:, w:]))
                x = x.add_(combine.bias)
            else:
                x = combine(h).add_(x_hat)
            x = F.leaky_relu(x, inplace=True)
        return x


@register_recommender("mmgcn")
class MMGCN(GraphRecommender):
    """score(u, i) = <r_u, r_i>, r the mean over modalities of each modality GCN's output."""

    uses_features = True
    config_class = MMGCNConfig

    def __init__(self, data: InteractionData, features: ItemFeatures | None, config: MMGCNConfig):
        super().__init__(data, features, config)
        if features is None:
            raise ValueError("mmgcn uses item features, but none were given")
        adjacency, transposed = mean_adjacency(data)
        self.register_buffer("adjacency", adjacency, persistent=False)
        self.register_buffer("adjacency_t", transposed, persistent=False)
        self.id_embedding = _weight(
            self.n_users + self.n_items, config.embedding_size, config.learn_embeddings
        )
        self.gcns = nn.ModuleDict()
        for name, latent in (("image", config.image_latent_size), ("text", None)):
            tensor = getattr(features, name)
            if tensor is not None:
                self.register_buffer(f"{name}_features", tensor.float(), persistent=False)
                self.gcns[name] = ModalityGCN(self.n_users, tensor.shape[1], latent, config)

    def set_item_features(self, features: ItemFeatures) -> None:
        """Read ``features`` from now on."""
        self.check_features(features, tuple(self.gcns))
        for name in self.gcns:
            setattr(self, f"{name}_features", getattr(features, name).float())
        self.forget()

    def forward(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Representations of users then items, [(U + I), d] (or of ``rows`` only, [R, d]):
        the mean over modalities."""
        graph = (self.adjacency, self.adjacency_t)
        reps = [
            gcn(getattr(self, f"{name}_features"), self.id_embedding, graph, rows)
            for name, gcn in self.gcns.items()
        ]
        return sum(reps) / len(reps)

    def loss(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """BPR loss + reg_weight * (batch ID embeddings' and preferences' mean squares)."""
        pos, neg = pos + self.n_users, neg + self.n_users
        rows, where = torch.unique(torch.cat([users, pos, neg]), return_inverse=True)
        u, p, n = self.forward(rows)[where].chunk(3)  # [B, d] each
        ranking = bpr_loss((u * p).sum(dim=1), (u * n).sum(dim=1))
        ids = self.id_embedding
        # MMRec: mean over the 2B (user, item) rows of u^2 + i^2, the user counted twice
        reg = (2 * ids[users].pow(2).sum() + ids[pos].pow(2).sum() + ids[neg].pow(2).sum()) / (
            2 * ids.shape[1] * len(users)
        )
        reg = reg + sum(gcn.preference.pow(2).mean() for gcn in self.gcns.values())
        return ranking + self.config.reg_weight * reg

    def score(self, users: torch.Tensor) -> torch.Tensor:
        """Inner products with every item's representation, [B, n_items]."""
        out = self.propagated()
        return out[users] @ out[self.n_users :].T
