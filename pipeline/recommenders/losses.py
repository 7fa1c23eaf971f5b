"""Losses shared by the recommenders, written once: BPR, embedding regularisation, InfoNCE."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bpr_loss(pos_scores: torch.Tensor, neg_scores: torch.Tensor) -> torch.Tensor:
    """Bayesian personalised ranking loss, mean over the batch: -log sigmoid(pos - neg).

    MMRec (``common/loss.py`` BPRLoss) computes ``-log(1e-10 + sigmoid(pos - neg))``; this is
    the same value written stably (softplus), without the 1e-10 floor that zeroes the gradient
    of badly ranked pairs (pos - neg < about -23).
    """
    return F.softplus(neg_scores - pos_scores).mean()


def l2_reg(*embeddings: torch.Tensor, squared: bool = False) -> torch.Tensor:
    """Regularisation of a batch of embeddings, divided by the batch size (rows of the last).

    ``squared=False`` is MMRec's EmbLoss (used by its BPR, VBPR, LightGCN): the sum of the
    Frobenius norms ``sum_i ||E_i||_2 / B``. ``squared=True`` is the halved squared L2 norm
    ``sum_i ||E_i||^2 / (2 B)`` that LATTICE-style models use.
    """
    if not embeddings:
        raise ValueError("l2_reg needs at least one tensor")
    if squared:
        total = sum(e.pow(2).sum() for e in embeddings) / 2
    else:
        total = sum(torch.linalg.vector_norm(e) for e in embeddings)
    return total / embeddings[-1].shape[0]


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
