"""Contrastive pretraining of a CLIP from random initialisation on image-caption pairs.

The demo world's stand-in for web-scale pretraining: the ``weights`` stage runs it on the
synthetic corpus to make the demo's "pretrained" CLIP weights. Symmetric InfoNCE (open_clip's
``ClipLoss``) with a learnable temperature, AdamW with linear warmup then cosine decay, and mild
augmentation: a random resized crop and a horizontal flip, never colour jitter (colour is one of
the attributes the features must carry).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2
from tqdm import tqdm

from pipeline.encoders.base import resolve_device
from pipeline.encoders.clip import DEMO_TAG, ClipEncoder
from pipeline.seeding import seed_everything

log = logging.getLogger(__name__)

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the temperature at 1/100


@dataclass(frozen=True)
class PretrainConfig:
    """Pretraining settings. The defaults train ``lmmrec-clip-tiny`` on 8000 64x64 pairs in
    about 3.2 minutes on 2 otherwise idle CPU cores (about 31 s per epoch of 60 steps)."""

    epochs: int = 6
    batch_size: int = 128  # pairs per step; every other pair of the batch is a negative
    lr: float = 1e-3  # peak learning rate, reached after the warmup
    weight_decay: float = 0.1  # AdamW, on weight matrices only (not gains, biases, temperature)
    warmup_steps: int = 50  # linear warmup, then cosine decay to 0 over the remaining steps
    min_crop_scale: float = 0.7  # random resized crop keeps this to 100% of the image area
    hflip: bool = True  # random horizontal flips
    holdout_pairs: int = 256  # pairs kept out of training, scored for retrieval each epoch
    device: str = "auto"  # auto | cpu | cuda | cuda:<n>
    seed: int = 2022


def _check(cfg: PretrainConfig, n_pairs: int) -> None:
    if cfg.epochs < 1 or cfg.batch_size < 2 or cfg.lr <= 0 or cfg.warmup_steps < 0:
        raise ValueError(f"bad pretraining config {cfg}: need epochs >= 1, batch_size >= 2, lr > 0")
    if not 0 < cfg.min_crop_scale <= 1:
        raise ValueError(f"min_crop_scale must be in (0, 1], got {cfg.min_crop_scale}")
    if not 0 <= cfg.holdout_pairs <= n_pairs - 2:
        raise ValueError(f"holdout_pairs={cfg.holdout_pairs} leaves < 2 of {n_pairs} pairs")


def _pixels(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """PIL images -> [N, 3, size, size] uint8, resized and centre-cropped as at evaluation."""
    prep = v2.Compose(
        [v2.Resize(size, v2.InterpolationMode.BICUBIC), v2.CenterCrop(size), v2.PILToTensor()]
    )
    return torch.stack([prep(img.convert("RGB")) for img in images])


def _normalise(pixels: torch.Tensor, encoder: ClipEncoder) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float, scaled to [0, 1] then standardised by the encoder's mean/std."""
    mean = torch.tensor(encoder.mean, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(encoder.std, device=pixels.device).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


def _augment(x: torch.Tensor, cfg: PretrainConfig, gen: torch.Generator) -> torch.Tensor:
    """Per-image random resized crop (area in [min_crop_scale, 1]) and flip, as one affine warp."""
    b = x.shape[0]
    side = torch.sqrt(torch.empty(b).uniform_(cfg.min_crop_scale, 1.0, generator=gen))
    shift = (torch.rand(b, 2, generator=gen) * 2 - 1) * (1 - side)[:, None]
    flip = torch.ones(b)
    if cfg.hflip:
        flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = side * flip, side
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only, as open_clip's training does."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "bias" in name or "ln" in name or "logit_scale" in name
        (no_decay if skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


@torch.inference_mode()
def embed_pairs(
    encoder: ClipEncoder, pixels: torch.Tensor, tokens: torch.Tensor, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N, 3, H, W] and token ids [N, L] -> L2-normalised embeddings [N, D] each."""
    was_training = encoder.training
    encoder.eval()
    img, txt = [], []
    for i in range(0, len(pixels), batch_size):
        x = _normalise(pixels[i : i + batch_size].to(encoder.device), encoder)
        img.append(F.normalize(encoder.encode_images(x), dim=-1).float().cpu())
        t = tokens[i : i + batch_size].to(encoder.device)
        txt.append(F.normalize(encoder.encode_texts(t), dim=-1).float().cpu())
    encoder.train(was_training)
    return torch.cat(img), torch.cat(txt)


def retrieval_recall(
    image_emb: torch.Tensor, text_emb: torch.Tensor, ks: Sequence[int] = (1, 10)
) -> dict[str, float]:
    """Recall@k of the paired item among N, both ways: ``i2t_r<k>`` and ``t2i_r<k>``.

    Row i of ``image_emb`` [N, D] is paired with row i of ``text_emb`` [N, D]; chance is k/N.
    """
    sims = image_emb @ text_emb.T  # [N, N]
    target = torch.arange(len(sims))
    out = {}
    for direction, s in (("i2t", sims), ("t2i", sims.T)):
        rank = (s > s[target, target][:, None]).sum(dim=1)  # how many beat the true pair
        for k in ks:
            out[f"{direction}_r{k}"] = float((rank < k).float().mean())
    return out


def pretrain_clip(
    arch: str,
    images: Sequence[Image.Image],
    captions: Sequence[str],
    cfg: PretrainConfig = PretrainConfig(),
) -> tuple[ClipEncoder, dict]:
    """Train CLIP ``arch`` from a seeded random init on (image, caption) pairs.

    Returns the encoder (eval mode, on cpu, tagged ``pretrained="demo"``) and a history of
    per-epoch lists: ``loss``, ``lr``, ``logit_scale``, ``seconds`` and, with held-out pairs,
    ``valid_i2t_r1``, ``valid_i2t_r10``, ``valid_t2i_r1``, ``valid_t2i_r10``.
    """
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    _check(cfg, len(images))
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    encoder = ClipEncoder.from_arch(arch).to(device)
    pixels = _pixels(images, encoder.image_size)  # [N, 3, S, S] uint8
    tokens = encoder.tokenize(captions)  # [N, L]

    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(images), generator=gen)
    valid, train = order[: cfg.holdout_pairs], order[cfg.holdout_pairs :]
    batch_size = min(cfg.batch_size, len(train))
    steps_per_epoch = len(train) // batch_size  # the ragged tail is dropped, reshuffled next epoch
    total_steps = steps_per_epoch * cfg.epochs

    opt = torch.optim.AdamW(
        _param_groups(encoder.model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(cfg.warmup_steps, total_steps))
    loss_fn = open_clip.ClipLoss()
    history: dict[str, list[float]] = {"loss": [], "lr": [], "logit_scale": [], "seconds": []}
    log.info(
        "pretraining %s on %d pairs (%d held out): %d epochs x %d steps of %d",
        arch, len(train), len(valid), cfg.epochs, steps_per_epoch, batch_size,
    )  # fmt: skip

    for epoch in range(cfg.epochs):
        encoder.train()
        start, losses = time.perf_counter(), []
        perm = train[torch.randperm(len(train), generator=gen)]
        bar = tqdm(range(steps_per_epoch), desc=f"pretrain {epoch + 1}/{cfg.epochs}", disable=None)
        for step in bar:
            idx = perm[step * batch_size : (step + 1) * batch_size]
            x = _augment(_normalise(pixels[idx].to(device), encoder), cfg, gen)
            img = F.normalize(encoder.encode_images(x), dim=-1)  # [B, D]
            txt = F.normalize(encoder.encode_texts(tokens[idx].to(device)), dim=-1)  # [B, D]
            loss = loss_fn(img, txt, encoder.logit_scale.exp())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                encoder.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        history["loss"].append(sum(losses) / len(losses))
        history["lr"].append(sched.get_last_lr()[0])
        history["logit_scale"].append(encoder.logit_scale.exp().item())
        history["seconds"].append(time.perf_counter() - start)
        if len(valid):
            recall = retrieval_recall(*embed_pairs(encoder, pixels[valid], tokens[valid]))
            for key, value in recall.items():
                history.setdefault(f"valid_{key}", []).append(value)
        log.info(
            "epoch %d: loss %.4f, %.1fs%s", epoch + 1, history["loss"][-1], history["seconds"][-1],
            "".join(f", {k} {v[-1]:.3f}" for k, v in history.items() if k.startswith("valid")),
        )  # fmt: skip

    encoder.pretrained = DEMO_TAG
    encoder.source = (
        f"demo pretraining: {len(train)} pairs, {cfg.epochs} epochs, "
        f"final loss {history['loss'][-1]:.4f}"
    )
    return encoder.cpu().eval(), history
