"""Image-text training of any encoder family on matched pairs: demo pretraining and fine-tuning.

The loop knows only the ``Encoder`` interface: the family's ``pair_losses`` (CLIP: ITC; VLMo:
ITC + ITM + MLM) is summed and minimised with AdamW (linear warmup, cosine decay), mild
augmentation (a random resized crop and a horizontal flip as one affine warp, never colour
jitter: colour is an attribute the features must carry), optional gradient accumulation and
bf16 autocast. A seeded random share of the pairs is held out and scored for image->text
retrieval after every epoch (and before the first); with ``patience`` the best epoch by
held-out i2t Recall@10 is kept and training stops early.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from pipeline.core.distributed import World, resolve_device, sum_gradients
from pipeline.core.seeding import seed_everything
from pipeline.encoders.base import (
    Encoder,
    Tokens,
    autocast,
    check_precision,
    select_tokens,
    to_device,
)

log = logging.getLogger(__name__)

STOP_METRIC = "i2t_r10"


@dataclass(frozen=True)
class PairTrainConfig:
    """Image-text training settings (the ``weights`` and ``finetune`` params sections)."""

    epochs: int = 6
    batch_size: int = 128  # pairs per optimiser step; the batch's other pairs are the negatives
    grad_accum: int = 1  # micro-batches per step (each micro-batch is its own contrastive batch)
    lr: float = 1e-3  # peak learning rate, reached after the warmup
    weight_decay: float = 0.1  # AdamW, on weight matrices only (not gains, biases, temperature)
    warmup_steps: int = 50  # linear warmup, then cosine decay to 0 over the remaining steps
    min_crop_scale: float = 0.7  # random resized crop keeps this to 100% of the image area
    hflip: bool = True  # random horizontal flips
    holdout: float = 0.1  # share of pairs held out and scored for retrieval after each epoch
    patience: int = 0  # epochs without held-out i2t R@10 gain before stopping (0: never stop)
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda | cuda:<n>
    seed: int = 2022

    def check(self, n_pairs: int) -> None:
        """Raise, naming the bad field, if the settings cannot train on ``n_pairs`` pairs."""
        if self.epochs < 1 or self.batch_size < 2 or self.grad_accum < 1:
            raise ValueError(
                f"need epochs >= 1, batch_size >= 2, grad_accum >= 1; got epochs={self.epochs}, "
                f"batch_size={self.batch_size}, grad_accum={self.grad_accum}"
            )
        if self.lr <= 0 or self.warmup_steps < 0 or self.patience < 0:
            raise ValueError(
                f"need lr > 0, warmup_steps >= 0, patience >= 0; got lr={self.lr}, "
                f"warmup_steps={self.warmup_steps}, patience={self.patience}"
            )
        if not 0 < self.min_crop_scale <= 1:
            raise ValueError(f"min_crop_scale must be in (0, 1], got {self.min_crop_scale}")
        check_precision(self.precision)
        n_valid = round(self.holdout * n_pairs)
        if not 0 <= self.holdout < 1 or n_pairs - n_valid < 2:
            raise ValueError(
                f"holdout={self.holdout} of {n_pairs} pairs leaves fewer than 2 to train on"
            )
        if self.patience and n_valid < 2:
            raise ValueError(f"patience={self.patience} needs held-out pairs; holdout gives none")


def image_pixels(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """PIL images -> [N, 3, size, size] uint8, resized and centre-cropped as at evaluation."""
    from torchvision.transforms import v2  # ~1.5 s to import: not for a params check

    prep = v2.Compose(
        [v2.Resize(size, v2.InterpolationMode.BICUBIC), v2.CenterCrop(size), v2.PILToTensor()]
    )
    return torch.stack([prep(img.convert("RGB")) for img in images])


def normalise(pixels: torch.Tensor, encoder: Encoder) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float, scaled to [0, 1] then standardised by the encoder's mean/std."""
    mean = torch.tensor(encoder.mean, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(encoder.std, device=pixels.device).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


def augment(x: torch.Tensor, cfg: PairTrainConfig, gen: torch.Generator) -> torch.Tensor:
    """Per-image random resized crop (area in [min_crop_scale, 1]) and flip, as one affine warp."""
    theta = warps(x.shape[0], cfg, gen)
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def warps(b: int, cfg: PairTrainConfig, gen: torch.Generator) -> torch.Tensor:
    """``b`` random crop-and-flip affine matrices [b, 2, 3] drawn from ``gen``."""
    side = torch.sqrt(torch.empty(b).uniform_(cfg.min_crop_scale, 1.0, generator=gen))
    shift = (torch.rand(b, 2, generator=gen) * 2 - 1) * (1 - side)[:, None]
    flip = torch.ones(b)
    if cfg.hflip:
        flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = side * flip, side
    theta[:, :, 2] = shift
    return theta


def _param_groups(encoder: Encoder, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only, as open_clip's training does."""
    trainable = {id(p) for p in encoder.trainable_parameters()}
    decay, no_decay = [], []
    for name, p in encoder.named_parameters():
        if id(p) not in trainable:
            continue
        skip = p.ndim < 2 or "bias" in name or "norm" in name or "ln" in name or "scale" in name
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
    encoder: Encoder, pixels: torch.Tensor, tokens: Tokens, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N, 3, H, W] and M texts' tokens -> L2-normalised [N, D] and [M, D]."""
    was_training = encoder.training
    encoder.eval()
    n_texts = len(tokens) if isinstance(tokens, torch.Tensor) else len(next(iter(tokens.values())))
    img, txt = [], []
    for i in range(0, len(pixels), batch_size):
        x = normalise(pixels[i : i + batch_size].to(encoder.device), encoder)
        img.append(F.normalize(encoder.encode_images(x).float(), dim=-1).cpu())
    for i in range(0, n_texts, batch_size):
        index = torch.arange(i, min(i + batch_size, n_texts))
        t = to_device(select_tokens(tokens, index), encoder.device)
        txt.append(F.normalize(encoder.encode_texts(t).float(), dim=-1).cpu())
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


def split_pairs(n_pairs: int, cfg: PairTrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (train, held-out) indices of ``n_pairs`` pairs."""
    order = torch.randperm(n_pairs, generator=torch.Generator().manual_seed(cfg.seed))
    n_valid = round(cfg.holdout * n_pairs)
    return order[n_valid:], order[:n_valid]


def train_pairs(
    encoder: Encoder,
    images: Sequence[Image.Image],
    texts: Sequence[str],
    cfg: PairTrainConfig = PairTrainConfig(),
    world: World | None = None,
) -> dict[str, list[float]]:
    """Train ``encoder`` in place on (image, text) pairs with its own ``pair_losses``.

    Returns per-epoch lists: ``loss`` (and each named part, e.g. ``loss_itc``), ``lr`` and,
    with held-out pairs, ``valid_i2t_r1`` ... ``valid_t2i_r10``, whose entry 0 is the score
    before training; no wall-clock times (they are logged), so the history is the same on
    every run of the same inputs. With ``patience`` the encoder ends at its best epoch,
    recorded as ``best_epoch`` (0: training never beat the starting weights).
    Leaves the encoder on the CPU in eval mode.

    Under torchrun (``world``) the processes take contiguous shares of each step's
    ``grad_accum`` micro-batches and sum their gradients: the same steps as one process
    (losses that draw from torch's global generator, such as VLMo's masking, draw per
    process). The logged losses are those of this process's micro-batches.
    """
    world = world or World()
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} texts")
    cfg.check(len(images))
    if cfg.grad_accum < world.size:
        raise ValueError(
            f"grad_accum = {cfg.grad_accum} with {world.size} processes: each process takes "
            f"whole micro-batches, so use grad_accum >= {world.size}"
        )
    seed_everything(cfg.seed)
    device = world.device(resolve_device(cfg.device))
    encoder.to(device)
    pixels = image_pixels(images, encoder.image_size)  # [N, 3, S, S] uint8
    tokens = encoder.tokenize(list(texts))
    train, valid = split_pairs(len(images), cfg)

    gen = torch.Generator().manual_seed(cfg.seed)
    micro = min(cfg.batch_size, len(train))
    steps_per_epoch = len(train) // (micro * cfg.grad_accum)
    if steps_per_epoch < 1:
        raise ValueError(f"{len(train)} training pairs < one step of {micro} x {cfg.grad_accum}")
    total_steps = steps_per_epoch * cfg.epochs
    # fused: one kernel a parameter; torch's CPU default is a per-tensor loop (~12% of a demo
    # CLIP step) with the same update up to the last float bits
    opt = torch.optim.AdamW(
        _param_groups(encoder, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6,
        fused=True,
    )  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(cfg.warmup_steps, total_steps))
    history: dict[str, list[float]] = {"loss": [], "lr": []}

    def score() -> None:
        if len(valid):
            embedded = embed_pairs(encoder, pixels[valid], select_tokens(tokens, valid))
            recall = retrieval_recall(*embedded)
            for key, value in recall.items():
                history.setdefault(f"valid_{key}", []).append(value)

    score()
    best = (0.0, 0, None)
    if cfg.patience:
        best = (history[f"valid_{STOP_METRIC}"][0], 0, copy.deepcopy(encoder.state_dict()))
    log.info(
        "training %s/%s on %d pairs (%d held out): %d epochs x %d steps of %d x %d",
        encoder.name, encoder.arch, len(train), len(valid), cfg.epochs, steps_per_epoch,
        micro, cfg.grad_accum,
    )  # fmt: skip
    for epoch in range(1, cfg.epochs + 1):
        encoder.train()
        start, parts = time.perf_counter(), {}
        perm = train[torch.randperm(len(train), generator=gen)]
        desc = f"image-text {epoch}/{cfg.epochs}"
        bar = tqdm(range(steps_per_epoch), desc=desc, disable=None if world.is_main else True)
        mine = range(cfg.grad_accum)[world.shard(cfg.grad_accum)]
        for step in bar:
            opt.zero_grad(set_to_none=True)
            for m in range(cfg.grad_accum):
                at = (step * cfg.grad_accum + m) * micro
                idx = perm[at : at + micro]
                if m not in mine:
                    warps(len(idx), cfg, gen)  # keep the augmentation draws in step
                    continue
                x = augment(normalise(pixels[idx].to(device), encoder), cfg, gen)
                with autocast(device, cfg.precision):
                    losses = encoder.pair_losses(x, to_device(select_tokens(tokens, idx), device))
                    loss = sum(losses.values())
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"{encoder.name} image-text loss is {loss.item()} at epoch {epoch}, "
                        f"step {step}: lower lr (now {cfg.lr}) or use precision fp32"
                    )
                (loss / cfg.grad_accum).backward()
                for name, value in {"loss": loss, **losses}.items():
                    key = name if name == "loss" else f"loss_{name}"
                    parts.setdefault(key, []).append(value.item())
            sum_gradients([p for g in opt.param_groups for p in g["params"]], world)
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{parts['loss'][-1]:.3f}")
        for key, values in parts.items():
            history.setdefault(key, []).append(sum(values) / len(values))
        history["lr"].append(sched.get_last_lr()[0])
        seconds = time.perf_counter() - start
        score()
        log.info(
            "epoch %d: loss %.4f, %.1fs%s", epoch, history["loss"][-1], seconds,
            "".join(f", {k} {v[-1]:.3f}" for k, v in history.items() if k.startswith("valid")),
        )  # fmt: skip
        if cfg.patience:
            current = history[f"valid_{STOP_METRIC}"][-1]
            if current > best[0]:
                best = (current, epoch, copy.deepcopy(encoder.state_dict()))
            elif epoch - best[1] >= cfg.patience:
                log.info("no held-out %s gain for %d epochs: stopping", STOP_METRIC, cfg.patience)
                break
    if cfg.patience:
        encoder.load_state_dict(best[2])
        history["best_epoch"] = [best[1]]
    encoder.cpu().eval()
    return history
