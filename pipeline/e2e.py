"""End-to-end training: the LMM and a recommender trained together from raw item images and
texts, starting from the pretrained LMM weights and never reading the feature store.

Each step encodes only the batch's unique items (positives and negatives), with gradients;
every other item's features come from a memory bank, an [n_items, d] table per modality.
The recommender reads the bank with the fresh rows put in, so graph models see the whole
catalogue while the recommendation loss reaches the encoder through the batch's items. After
each optimiser step the fresh rows (gathered from every process under torchrun) are written
into the bank; before each evaluation the bank is recomputed for every item without
gradients, in batches. Memory therefore grows with the batch (activations of its items) and
only by a few small tables with the catalogue: the JPEG bytes, the token ids and the bank.

Unlike the LMM4Rec authors' end-to-end mode, whose features were detached, the encoder here is
trained by the recommendation loss (``tests/test_e2e.py`` checks its gradients and weights).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.distributed import World, gather_variable
from pipeline.encoders.base import Encoder, autocast, check_precision, select_tokens, to_device
from pipeline.features import ExtractConfig, extract_features
from pipeline.interactions import InteractionData
from pipeline.recommenders import get_recommender
from pipeline.recommenders.base import ItemFeatures, Recommender
from pipeline.training import TrainConfig, train

log = logging.getLogger(__name__)

ENCODER_DIR = "encoder"  # the trained encoder's weights folder inside the run's output


@dataclass(frozen=True)
class E2EConfig:
    """What end-to-end training adds to the recommender's training settings."""

    encoder_lr: float = 1e-5  # Adam learning rate of the encoder (the recommender: train.lr)
    freeze_layers: int = 0  # input embeddings + this many lowest blocks per tower stay fixed
    precision: str = "auto"  # encoder forward passes: auto (bf16 on CUDA, fp32 on CPU) | fp32
    refresh_batch_size: int = 128  # items per forward pass when the bank is recomputed
    warm_start: bool = True  # start the recommender from its run on the pretrained features

    def __post_init__(self) -> None:
        if not self.encoder_lr > 0:
            raise ValueError(f"encoder_lr = {self.encoder_lr}; use a positive learning rate")
        if self.freeze_layers < 0:
            raise ValueError(f"freeze_layers = {self.freeze_layers}; use a value >= 0")
        if self.refresh_batch_size < 1:
            raise ValueError(f"refresh_batch_size = {self.refresh_batch_size}; use at least 1")
        check_precision(self.precision)


def catalogue(items: pa.Table, n_items: int) -> pa.Table:
    """``items`` in item-id order; they must be exactly the interactions' items 0..n-1."""
    items = items.sort_by("item_id")
    ids = items.column("item_id").to_numpy()
    if not np.array_equal(ids, np.arange(n_items)):
        raise ValueError(
            f"the items table has {len(ids)} items (ids {ids[:3].tolist()}...), the "
            f"interactions {n_items}: end to end needs exactly the item ids 0..{n_items - 1}"
        )
    return items


class EndToEnd(Recommender):
    """A recommender whose item features come from an encoder trained with it.

    ``loss`` encodes the batch's unique items with gradients and hands the recommender the
    memory bank with those rows replaced; ``after_step`` writes them into the bank; switching
    to eval mode (the trainer does so before scoring) recomputes the whole bank. The state dict
    holds the recommender (``recommender.*``) and the encoder (``encoder.*``); ``model.pt``
    keeps the recommender only, the encoder is saved as a weights folder.
    """

    uses_features = True

    def __init__(
        self,
        data: InteractionData,
        recommender: Recommender,
        encoder: Encoder,
        items: pa.Table,
        bank: ItemFeatures,
        cfg: E2EConfig,
        world: World,
    ) -> None:
        super().__init__(data, bank, {"recommender": recommender.config, "e2e": cfg})
        self.name = f"{recommender.name}+{encoder.name}"
        self.recommender, self.encoder, self.cfg, self.world = recommender, encoder, cfg, world
        self.items = items
        self.tokens = encoder.tokenize(items.column("text").to_pylist())
        self.register_buffer("bank_image", bank.image, persistent=False)
        self.register_buffer("bank_text", bank.text, persistent=False)
        self._fresh: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._stale = False  # the bank predates the encoder's weights (after a load)
        self.register_load_state_dict_post_hook(_stale_after_load)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """The recommender at ``lr``, the encoder's unfrozen parameters at ``encoder_lr``."""
        own = self.recommender.param_groups(lr)
        trainable = [p for p in self.encoder.parameters() if p.requires_grad]
        return [*own, {"params": trainable, "lr": self.cfg.encoder_lr}]

    def images(self, ids: torch.Tensor) -> torch.Tensor:
        """The preprocessed images of items ``ids``, decoded now: [B, 3, H, W]."""
        column, transform = self.items.column("image_bytes"), self.encoder.image_transform
        out = []
        for i in ids.tolist():
            with Image.open(io.BytesIO(column[i].as_py())) as img:
                out.append(transform(img.convert("RGB")))
        return torch.stack(out)

    def encode(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised image and text features of items ``ids``, with gradients."""
        device = self.encoder.device
        images = self.images(ids).to(device)
        tokens = to_device(select_tokens(self.tokens, ids.cpu()), device)
        with autocast(device, self.cfg.precision):
            image, text = self.encoder.encode_images(images), self.encoder.encode_texts(tokens)
        return F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)

    def loss(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """The recommender's loss on the bank with the batch's items freshly encoded."""
        if self._stale:
            self.refresh()
        ids = torch.unique(torch.cat([pos, neg]))
        image, text = self.encode(ids)
        self._fresh.append((ids, image.detach(), text.detach()))
        fresh = ItemFeatures(
            image=self.bank_image.index_put((ids,), image),
            text=self.bank_text.index_put((ids,), text),
        )
        self.recommender.set_item_features(fresh)
        return self.recommender.loss(users, pos, neg)

    def after_step(self) -> None:
        """Write the step's fresh rows, from every process, into the bank (in rank order)."""
        if not self._fresh:
            ids = torch.zeros(0, dtype=torch.int64, device=self.bank_image.device)
            image, text = self.bank_image[:0], self.bank_text[:0]
        else:
            ids, image, text = (torch.cat(parts) for parts in zip(*self._fresh, strict=True))
        self._fresh.clear()
        for rank_ids, rank_image, rank_text in zip(
            gather_variable(ids, self.world),
            gather_variable(image, self.world),
            gather_variable(text, self.world),
            strict=True,
        ):
            self.bank_image[rank_ids] = rank_image
            self.bank_text[rank_ids] = rank_text

    def refresh(self) -> None:
        """Recompute every item's features with the current encoder (no gradients, batched,
        each process a shard) and let the recommender read them."""
        cfg = ExtractConfig(
            batch_size=self.cfg.refresh_batch_size,
            precision=self.cfg.precision,
            device=str(self.encoder.device),
        )
        image, text = extract_features(self.encoder, self.items, cfg, world=self.world,
                                       everywhere=True)  # fmt: skip
        self.bank_image.copy_(torch.from_numpy(image))
        self.bank_text.copy_(torch.from_numpy(text))
        self.recommender.set_item_features(ItemFeatures(image=self.bank_image, text=self.bank_text))
        self._stale = False

    def train(self, mode: bool = True) -> EndToEnd:
        """Switch mode; entering eval mode (or training after a load) refreshes the bank."""
        super().train(mode)
        if not mode or self._stale:
            self.refresh()
        return self

    def score(self, users: torch.Tensor) -> torch.Tensor:
        """The recommender's scores on the refreshed bank."""
        return self.recommender.score(users)

    def saved_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The recommender's part (the encoder is written as its own weights folder)."""
        return {k: v for k, v in state.items() if not k.startswith("encoder.")}


def _stale_after_load(module: EndToEnd, incompatible_keys: object) -> None:
    """New encoder weights make the bank stale."""
    module._stale = True


def warm_start(recommender: Recommender, state: Mapping[str, torch.Tensor]) -> None:
    """Load a trained run's ``model.pt`` state into ``recommender``: every tensor it has must
    be there; tensors it does not have (LATTICE's trained feature copies) are left out."""
    own = recommender.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise ValueError(f"{recommender.name}: the warm-start state lacks {missing[:5]}")
    unused = sorted(set(state) - set(own))
    if unused:
        log.info("%s warm start: not used end to end: %s", recommender.name, unused)
    recommender.load_state_dict({k: state[k] for k in own})


def build_end_to_end(
    name: str,
    data: InteractionData,
    encoder: Encoder,
    items: pa.Table,
    model_config: Mapping[str, Any] | Any | None,
    cfg: E2EConfig,
    device: torch.device,
    world: World | None = None,
    init: Mapping[str, torch.Tensor] | None = None,
) -> EndToEnd:
    """Freeze the encoder's lower layers, fill the bank with its features and build the
    registered recommender ``name`` on them (seed torch first for reproducibility), starting
    from the trained state ``init`` when given."""
    world = world or World()
    items = catalogue(items, data.n_items)
    frozen = encoder.freeze_lower_layers(cfg.freeze_layers)
    log.info("end to end: %s with %s %s (%d tensors frozen)", name, encoder.name, encoder.arch,
             frozen)  # fmt: skip
    encoder.to(device)
    extract = ExtractConfig(
        batch_size=cfg.refresh_batch_size, precision=cfg.precision, device=str(device)
    )
    image, text = extract_features(encoder, items, extract, world=world, everywhere=True)
    bank = ItemFeatures(image=torch.from_numpy(image), text=torch.from_numpy(text))
    recommender = get_recommender(name).build(data, bank, model_config)
    if not recommender.uses_features:
        raise ValueError(f"{name} reads no item features: there is nothing to train end to end")
    recommender.set_item_features(bank)  # fails early for a model that cannot swap them
    if init is not None:
        warm_start(recommender, init)
    return EndToEnd(data, recommender, encoder, items, bank, cfg, world)


def train_end_to_end(
    model: EndToEnd,
    data: InteractionData,
    train_cfg: TrainConfig,
    out_dir: str | Path,
    checkpoint_path: str | Path | None = None,
) -> dict[str, Any]:
    """``train`` the end-to-end model (in its processes); rank 0 also writes the encoder of the
    best epoch to ``out_dir/encoder`` (a weights folder)."""
    metrics = train(model, data, train_cfg, out_dir, checkpoint_path, model.world)
    if model.world.is_main:
        encoder = model.encoder
        encoder.source = f"{encoder.source}; trained end to end with {model.recommender.name}"
        encoder.pretrained = f"{encoder.pretrained}+e2e:{model.recommender.name}"
        encoder.save(Path(out_dir) / ENCODER_DIR)
    log.info("%s end to end: %s", model.name, metrics)
    return metrics
