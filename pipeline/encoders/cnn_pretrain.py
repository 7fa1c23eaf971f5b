"""Supervised pretraining of the ``cnn_st`` image tower: the demo's stand-in for ImageNet.

The published baseline CNN was trained to classify images; the demo's CNN learns, on the
synthetic pretraining corpus, to classify what its images show: colour, pattern, shape and
product type (``IMAGE_ATTRIBUTES``), one linear head per attribute on the pooled features,
cross entropy averaged over heads. AdamW (no decay on norms and biases) under a one-cycle
schedule (warmup, then cosine decay); light augmentation: a random crop of the reflect-padded
image (a shift, so the size-coded shapes keep their size) and horizontal flips, never colour
jitter. The heads are thrown away; the text tower stays the packaged all-MiniLM-L6-v2.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline.core.distributed import resolve_device
from pipeline.core.seeding import seed_everything
from pipeline.data.demo.attributes import ATTRIBUTES, IMAGE_ATTRIBUTES
from pipeline.data.demo.corpus import Corpus
from pipeline.encoders import get_encoder
from pipeline.encoders.base import BASELINE, DEMO_TAG

if TYPE_CHECKING:  # torchvision (imported by cnn_st) costs ~1.5 s: only the stage that trains
    from pipeline.encoders.cnn_st import CnnStEncoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CnnPretrainConfig:
    """CNN pretraining settings. The defaults train ``lmmrec-cnn-tiny`` on 8000 64x64 pairs
    (8 epochs of 58 steps) in about 95 s on one idle CPU thread (118 s measured on a shared
    one), so about 60 s on 2 cores, to a held-out accuracy of about 0.84 (colour 0.99, pattern
    0.73, shape 0.77, product type 0.89; chance 0.07, 0.13, 0.17, 0.07)."""

    epochs: int = 8
    batch_size: int = 128  # images per step; the ragged tail of an epoch is dropped
    lr: float = 4e-3  # peak learning rate of the one-cycle schedule
    weight_decay: float = 0.05  # AdamW, on conv and linear weights only
    warmup_fraction: float = 0.1  # share of the steps spent warming up, then cosine decay
    crop_padding: int = 4  # random crop after reflect-padding by this many pixels (0: none)
    hflip: bool = True  # random horizontal flips
    holdout_pairs: int = 500  # images kept out of training, classified after each epoch
    device: str = "auto"  # auto | cpu | cuda | cuda:<n>
    seed: int = 2022

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2 or self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(
                f"bad CNN pretraining config {self}: need epochs >= 1, batch_size >= 2, "
                "lr > 0, weight_decay >= 0"
            )
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction = {self.warmup_fraction}; allowed [0, 1)")
        if self.crop_padding < 0 or self.holdout_pairs < 0:
            raise ValueError(
                f"crop_padding = {self.crop_padding} and holdout_pairs = {self.holdout_pairs} "
                "must be >= 0"
            )


def _pixels(corpus: Corpus, size: int) -> torch.Tensor:
    """The corpus images as uint8 [N, 3, size, size], resized and centre-cropped."""
    from torchvision.transforms import InterpolationMode, v2

    prep = v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(size, InterpolationMode.BILINEAR, antialias=True),
            v2.CenterCrop(size),
        ]
    )
    return torch.stack([prep(img.convert("RGB")) for img in corpus.images])


def _normalise(pixels: torch.Tensor, encoder: CnnStEncoder) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float, scaled to [0, 1] then standardised by the encoder's mean/std."""
    mean = torch.tensor(encoder.mean, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(encoder.std, device=pixels.device).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


def augment(x: torch.Tensor, padding: int, hflip: bool, gen: torch.Generator) -> torch.Tensor:
    """Per image: a random crop of the reflect-padded [B, C, H, W] batch, and a random flip."""
    b, _, h, w = x.shape
    if padding:
        padded = F.pad(x, (padding,) * 4, mode="reflect")
        dy, dx = torch.randint(0, 2 * padding + 1, (2, b), generator=gen).tolist()
        x = torch.stack(
            [
                padded[i, :, y : y + h, z : z + w]
                for i, (y, z) in enumerate(zip(dy, dx, strict=True))
            ]
        )
    if hflip:
        flip = (torch.rand(b, generator=gen) < 0.5).to(x.device).view(b, 1, 1, 1)
        x = torch.where(flip, x.flip(-1), x)
    return x


def _param_groups(modules: list[nn.Module], weight_decay: float) -> list[dict]:
    """Weight decay on conv and linear weights; none on norms and biases."""
    decay, no_decay = [], []
    for module in modules:
        for p in module.parameters():
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


@torch.inference_mode()
def attribute_accuracy(
    cnn: nn.Module,
    heads: nn.ModuleDict,
    x: torch.Tensor,
    labels: dict[str, torch.Tensor],
    batch_size: int = 256,
) -> dict[str, float]:
    """Accuracy of each head on normalised images [N, 3, H, W] with labels [N] per attribute."""
    was_training = cnn.training
    cnn.eval()
    hits = {name: 0 for name in heads}
    for i in range(0, len(x), batch_size):
        features = cnn(x[i : i + batch_size])
        for name, head in heads.items():
            predicted = head(features).argmax(dim=1).cpu()
            hits[name] += int((predicted == labels[name][i : i + batch_size]).sum())
    cnn.train(was_training)
    return {name: hit / len(x) for name, hit in hits.items()}


def pretrain_cnn(
    arch: str, corpus: Corpus, cfg: CnnPretrainConfig = CnnPretrainConfig()
) -> tuple[CnnStEncoder, dict]:
    """Train the CNN of ``arch`` from a seeded random init to classify the corpus images'
    visible attributes; returns the whole ``cnn_st`` encoder (eval mode, on cpu, tagged
    ``pretrained="demo"``) and per-epoch lists: ``loss``, ``lr`` and, with held-out pairs,
    ``valid_acc`` (mean over heads) and ``valid_acc_<attribute>``; epoch times are logged, not
    returned, so the history is the same on every run of the same inputs.
    Chance accuracy of an attribute is 1 / its number of values (the corpus draws uniformly).
    """
    family = get_encoder(BASELINE)  # imports cnn_st (torchvision) before anything is seeded
    missing = [a for a in IMAGE_ATTRIBUTES if a not in corpus.attributes]
    if missing:
        raise ValueError(f"corpus lacks labels for {missing}; it has {sorted(corpus.attributes)}")
    if not 0 <= cfg.holdout_pairs <= len(corpus) - 2:
        raise ValueError(f"holdout_pairs={cfg.holdout_pairs} leaves < 2 of {len(corpus)} pairs")
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    encoder = family.from_arch(arch)
    cnn = encoder.cnn.to(device)
    heads = nn.ModuleDict(
        {a: nn.Linear(encoder.image_dim, len(ATTRIBUTES[a].values)) for a in IMAGE_ATTRIBUTES}
    ).to(device)
    pixels = _pixels(corpus, encoder.image_size).to(device)  # [N, 3, S, S] uint8
    labels = {a: torch.as_tensor(np.asarray(corpus.attributes[a])) for a in IMAGE_ATTRIBUTES}

    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(corpus), generator=gen)
    valid, train = order[: cfg.holdout_pairs], order[cfg.holdout_pairs :]
    batch_size = min(cfg.batch_size, len(train))
    steps_per_epoch = len(train) // batch_size
    opt = torch.optim.AdamW(_param_groups([cnn, heads], cfg.weight_decay), lr=cfg.lr, fused=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=cfg.lr,
        total_steps=steps_per_epoch * cfg.epochs,
        pct_start=cfg.warmup_fraction,
        cycle_momentum=False,
    )
    history: dict[str, list[float]] = {"loss": [], "lr": []}
    log.info(
        "pretraining CNN %s on %d images (%d held out): %d epochs x %d steps of %d",
        arch,
        len(train),
        len(valid),
        cfg.epochs,
        steps_per_epoch,
        batch_size,
    )

    for epoch in range(cfg.epochs):
        cnn.train()
        start, losses = time.perf_counter(), []
        perm = train[torch.randperm(len(train), generator=gen)]
        bar = tqdm(range(steps_per_epoch), desc=f"cnn {epoch + 1}/{cfg.epochs}", disable=None)
        for step in bar:
            idx = perm[step * batch_size : (step + 1) * batch_size]
            x = _normalise(pixels[idx.to(device)], encoder)
            features = cnn(augment(x, cfg.crop_padding, cfg.hflip, gen))
            loss = torch.stack(
                [
                    F.cross_entropy(head(features), labels[a][idx].to(device))
                    for a, head in heads.items()
                ]
            ).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        history["loss"].append(sum(losses) / len(losses))
        history["lr"].append(sched.get_last_lr()[0])
        seconds = time.perf_counter() - start
        if len(valid):
            accuracy = attribute_accuracy(
                cnn,
                heads,
                _normalise(pixels[valid.to(device)], encoder),
                {a: v[valid] for a, v in labels.items()},
            )
            history.setdefault("valid_acc", []).append(float(np.mean(list(accuracy.values()))))
            for a, value in accuracy.items():
                history.setdefault(f"valid_acc_{a}", []).append(value)
        log.info(
            "epoch %d: loss %.4f, %.1fs%s",
            epoch + 1,
            history["loss"][-1],
            seconds,
            "".join(f", {k} {v[-1]:.3f}" for k, v in history.items() if k.startswith("valid")),
        )

    encoder.pretrained = DEMO_TAG
    held_out = f", held-out accuracy {history['valid_acc'][-1]:.3f}" if len(valid) else ""
    encoder.source = (
        f"demo supervised pretraining of {encoder.cnn_arch} on {', '.join(IMAGE_ATTRIBUTES)}: "
        f"{len(train)} images, {cfg.epochs} epochs, final loss {history['loss'][-1]:.4f}"
        f"{held_out}; text: packaged all-MiniLM-L6-v2"
    )
    return encoder.cpu().eval(), history
