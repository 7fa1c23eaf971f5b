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

With ``freeze_layers`` = k > 0 the input embeddings and the lowest k blocks of each tower are a
fixed function of the item, so their output token states (with what the upper blocks read:
attention masks, token ids) are computed once per run for every item (``PrefixCache``) and
each step and each refresh runs only the unfrozen blocks and the heads, decoding no JPEG.
The cache grows with the catalogue (token states per item: ``prefix_bytes_per_item``); above
``cache_max_bytes`` it is memory-mapped from disk rather than held in memory.

Unlike the LMM4Rec authors' end-to-end mode, whose features were detached, the encoder here is
trained by the recommendation loss (``tests/test_e2e.py`` checks its gradients and weights).
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.core.distributed import World, gather_rows, gather_variable, resolve_device
from pipeline.core.distributed import world as process_group
from pipeline.core.seeding import seed_everything
from pipeline.data.interactions import InteractionData, load_interactions
from pipeline.data.prepared import require_raw_items
from pipeline.data.schemas import ITEMS, read_table
from pipeline.encoders import load_encoder, read_card
from pipeline.encoders.base import (
    Encoder,
    Prefix,
    Tokens,
    autocast,
    check_precision,
    select_tokens,
    to_device,
    uses_bf16,
)
from pipeline.features.extract import ExtractConfig, decode_image, extract_features, finish
from pipeline.recommenders import get_recommender
from pipeline.recommenders.base import ItemFeatures, Recommender
from pipeline.training.trainer import TrainConfig, deterministic, train

log = logging.getLogger(__name__)

ENCODER_DIR = "encoder"  # the trained encoder's weights folder inside the run's output
MODALITIES = ("image", "text")


@dataclass(frozen=True)
class E2EConfig:
    """What end-to-end training adds to the recommender's training settings."""

    encoder_lr: float = 1e-5  # Adam learning rate of the encoder (the recommender: train.lr)
    freeze_layers: int = 0  # input embeddings + this many lowest blocks per tower stay fixed
    precision: str = "auto"  # encoder forward passes: auto (bf16 on CUDA, fp32 on CPU) | fp32
    refresh_batch_size: int = 128  # items per forward pass when the bank is recomputed
    warm_start: bool = True  # start the recommender from its run on the pretrained features
    prefix_cache: bool = True  # freeze_layers > 0: run the frozen layers once per run per item
    cache_max_bytes: int = 2 * 1024**3  # a larger prefix cache is a memory-mapped file

    def __post_init__(self) -> None:
        if not self.encoder_lr > 0:
            raise ValueError(f"encoder_lr = {self.encoder_lr}; use a positive learning rate")
        if self.freeze_layers < 0:
            raise ValueError(f"freeze_layers = {self.freeze_layers}; use a value >= 0")
        if self.refresh_batch_size < 1:
            raise ValueError(f"refresh_batch_size = {self.refresh_batch_size}; use at least 1")
        if self.cache_max_bytes < 0:
            raise ValueError(f"cache_max_bytes = {self.cache_max_bytes}; use a value >= 0")
        check_precision(self.precision)

    @property
    def cached(self) -> bool:
        """Whether steps and refreshes read the frozen layers' outputs from a ``PrefixCache``."""
        return self.prefix_cache and self.freeze_layers > 0


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


def decode_images(
    column: pa.ChunkedArray, ids: Sequence[int], transform: Callable[[Image.Image], torch.Tensor]
) -> torch.Tensor:
    """Rows ``ids`` of a JPEG-bytes column, decoded and preprocessed: [B, 3, H, W]."""
    return torch.stack([decode_image(column[i].as_py(), transform) for i in ids])


def items_sha256(items: pa.Table) -> str:
    """Hex SHA-256 of what the encoder reads of the items, in order: JPEG bytes and texts."""
    digest = hashlib.sha256()
    for column in ("image_bytes", "text"):
        for value in items.column(column):
            data = value.as_py()
            if data is None:
                digest.update(b"\xff" * 8)
                continue
            data = data.encode() if isinstance(data, str) else data
            digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


def cache_key(
    weights_sha256: str, items_sha: str, k: int, precision: str, dtype: torch.dtype
) -> str:
    """What a prefix cache's contents depend on: the frozen weights, the items, the split
    depth, the precision of the passes and the storage dtype."""
    text = f"{weights_sha256}|{items_sha}|{k}|{precision}|{dtype}"
    return hashlib.sha256(text.encode()).hexdigest()


class PrefixCache:
    """Every item's output of the frozen layers, per modality: ``parts[modality]`` is the
    ``Prefix`` of all n items ([n, ...] tensors: token states, attention mask or token ids).

    Float tensors are stored in float32 (exact) or bf16 when the passes run in bf16. They live
    on the encoder's device, or, when larger than ``E2EConfig.cache_max_bytes``, in files
    memory-mapped from a folder that ``close`` (or garbage collection) removes. ``key`` hashes
    the frozen weights, the items, k, the precision and the storage dtype.
    """

    def __init__(
        self,
        parts: dict[str, Prefix],
        k: int,
        weights_sha256: str,
        key: str,
        folder: Path | None = None,
    ) -> None:
        self.parts, self.k, self.weights_sha256, self.key = parts, k, weights_sha256, key
        self.folder = folder
        self._remove = weakref.finalize(self, shutil.rmtree, folder, True) if folder else None

    @property
    def nbytes(self) -> int:
        """Bytes held (in memory or mapped)."""
        return sum(t.numel() * t.element_size() for p in self.parts.values() for t in p.values())

    def rows(self, modality: str, ids: torch.Tensor, device: torch.device) -> Prefix:
        """The cached prefix of items ``ids`` on ``device``, floats as float32."""
        out = {}
        for name, table in self.parts[modality].items():
            part = table[ids.to(table.device)].to(device)
            out[name] = part.float() if part.is_floating_point() else part
        return out

    def fits(self, encoder: Encoder) -> bool:
        """Whether ``encoder``'s frozen layers are still the ones the cache was computed with."""
        return encoder.prefix_sha256(self.k) == self.weights_sha256

    def close(self) -> None:
        """Drop the tensors and remove the mapped files, if any."""
        self.parts = {}
        if self._remove is not None:
            self._remove()


def build_prefix_cache(
    encoder: Encoder,
    items: pa.Table,
    tokens: Tokens,
    cfg: E2EConfig,
    world: World,
    tmp_dir: str | Path | None = None,
) -> PrefixCache:
    """Run every item through ``encoder``'s input embeddings and lowest ``cfg.freeze_layers``
    blocks, without gradients, in eval mode, in batches of ``cfg.refresh_batch_size``: each
    process its shard, gathered batch by batch to every process. Above ``cfg.cache_max_bytes``
    the cache is written to memory-mapped files in a new folder under ``tmp_dir`` (default:
    the system's temporary folder)."""
    k, device, start = cfg.freeze_layers, encoder.device, time.perf_counter()
    dtype = torch.bfloat16 if uses_bf16(device, cfg.precision) else torch.float32
    weights = encoder.prefix_sha256(k)
    key = cache_key(weights, items_sha256(items), k, cfg.precision, dtype)
    n, size = len(items), cfg.refresh_batch_size
    shards = [World(rank, world.size).shard(n) for rank in range(world.size)]
    mine = shards[world.rank]
    rounds = max(math.ceil((s.stop - s.start) / size) for s in shards)
    parts: dict[str, Prefix] = {}
    folder = None
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad(), autocast(device, cfg.precision):
            for r in range(rounds):
                ids = torch.arange(mine.start, mine.stop)[r * size : (r + 1) * size]
                if len(ids):
                    batch = _prefix_batch(encoder, items, tokens, ids, k)
                else:  # this process's shard is done: it still takes part in the gathers
                    batch = {m: {name: t[:0].to(device) for name, t in p.items()}
                             for m, p in parts.items()}  # fmt: skip
                gathered = {
                    m: {
                        name: gather_variable(t.to(dtype) if t.is_floating_point() else t, world)
                        for name, t in prefix.items()
                    }
                    for m, prefix in batch.items()
                }
                if not parts:
                    parts, folder = _allocate(gathered, n, cfg.cache_max_bytes, device, tmp_dir)
                for m, prefix in gathered.items():
                    for name, per_rank in prefix.items():
                        for shard, part in zip(shards, per_rank, strict=True):
                            first = shard.start + r * size
                            parts[m][name][first : first + len(part)] = part
    except BaseException:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        encoder.train(was_training)
    cache = PrefixCache(parts, k, weights, key, folder)
    log.info(
        "prefix cache: %d items through the embeddings and %d blocks in %.1fs, %.1f MiB %s",
        n, k, time.perf_counter() - start, cache.nbytes / 2**20,
        f"mapped from {folder}" if folder else f"in memory ({device})",
    )  # fmt: skip
    return cache


def prefix_bytes_per_item(encoder: Encoder, k: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes one item takes in a prefix cache split after block ``k`` with floats stored as
    ``dtype``; the shapes come from one blank item's pass (the encoder may be on the meta
    device, so that a large arch costs no memory)."""
    device = encoder.device
    with torch.no_grad():
        image = torch.zeros(1, 3, encoder.image_size, encoder.image_size, device=device)
        tokens = to_device(encoder.tokenize([""]), device)
        prefixes = (encoder.image_prefix(image, k), encoder.text_prefix(tokens, k))
    return sum(
        t[0].numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
        for prefix in prefixes
        for t in prefix.values()
    )


def _prefix_batch(
    encoder: Encoder, items: pa.Table, tokens: Tokens, ids: torch.Tensor, k: int
) -> dict[str, Prefix]:
    """Items ``ids``, decoded and tokenised, through both towers' lowest ``k`` blocks."""
    device = encoder.device
    images = decode_images(items.column("image_bytes"), ids.tolist(), encoder.image_transform)
    tokens = to_device(select_tokens(tokens, ids), device)
    return {"image": encoder.image_prefix(images.to(device), k),
            "text": encoder.text_prefix(tokens, k)}  # fmt: skip


def _allocate(
    first: dict[str, dict[str, list[torch.Tensor]]],
    n: int,
    max_bytes: int,
    device: torch.device,
    tmp_dir: str | Path | None,
) -> tuple[dict[str, Prefix], Path | None]:
    """Empty [n, ...] tensors shaped as the first gathered batch's rows: on ``device``, or
    memory-mapped files in a new folder when they would exceed ``max_bytes``."""
    shapes = {
        (m, name): (per_rank[0].shape[1:], per_rank[0].dtype)
        for m, prefix in first.items()
        for name, per_rank in prefix.items()
    }
    total = sum(n * math.prod(shape) * dtype.itemsize for shape, dtype in shapes.values())
    folder = None
    if total > max_bytes:
        parent = Path(tmp_dir or tempfile.gettempdir())
        parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="e2e-prefix-cache-", dir=parent))
    parts: dict[str, Prefix] = {m: {} for m in first}
    for (m, name), (shape, dtype) in shapes.items():
        if folder is None:
            parts[m][name] = torch.empty((n, *shape), dtype=dtype, device=device)
        else:
            path = folder / f"{m}.{name}.bin"
            mapped = torch.from_file(str(path), shared=True, size=n * math.prod(shape), dtype=dtype)
            parts[m][name] = mapped.view(n, *shape)
    return parts, folder


def catalogue_features(
    encoder: Encoder,
    items: pa.Table,
    cfg: E2EConfig,
    world: World,
    cache: PrefixCache | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Every item's L2-normalised image and text features [n, d], on every process (each
    computes a shard), as ``extract`` computes them: from the JPEGs and texts, or with a
    ``cache`` from the cached frozen layers' outputs through the rest of the encoder."""
    device = encoder.device
    if cache is None:
        extract = ExtractConfig(
            batch_size=cfg.refresh_batch_size, precision=cfg.precision, device=str(device)
        )
        return extract_features(encoder, items, extract, world=world, everywhere=True)
    n, rows, k = len(items), world.shard(len(items)), cache.k
    image, text = [], []
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.inference_mode(), autocast(device, cfg.precision):
            for start in range(rows.start, rows.stop, cfg.refresh_batch_size):
                ids = torch.arange(start, min(start + cfg.refresh_batch_size, rows.stop))
                image.append(
                    encoder.image_suffix(cache.rows("image", ids, device), k).float().cpu()
                )
                text.append(encoder.text_suffix(cache.rows("text", ids, device), k).float().cpu())
    finally:
        encoder.train(was_training)
    return tuple(
        gather_rows(finish(torch.cat(parts), normalize=True), world, n, everywhere=True)
        for parts in (image, text)
    )


class EndToEnd(Recommender):
    """A recommender whose item features come from an encoder trained with it.

    ``loss`` encodes the batch's unique items with gradients and hands the recommender the
    memory bank with those rows replaced; ``after_step`` writes them into the bank; switching
    to eval mode (the trainer does so before scoring) recomputes the whole bank. With a frozen
    prefix (``cfg.cached``) both read the ``PrefixCache``, (re)built when missing or, at a
    refresh, when the frozen weights changed (``close`` removes it). The state dict
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
        cache: PrefixCache | None = None,
        tokens: Tokens | None = None,
        tmp_dir: str | Path | None = None,
    ) -> None:
        super().__init__(data, bank, {"recommender": recommender.config, "e2e": cfg})
        self.name = f"{recommender.name}+{encoder.name}"
        self.recommender, self.encoder, self.cfg, self.world = recommender, encoder, cfg, world
        self.items, self.cache, self.tmp_dir = items, cache, tmp_dir
        if tokens is None:
            tokens = encoder.tokenize(items.column("text").to_pylist())
        self.tokens = tokens
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
        return decode_images(self.items.column("image_bytes"), ids.tolist(),
                             self.encoder.image_transform)  # fmt: skip

    def prefix_cache(self) -> PrefixCache | None:
        """The frozen layers' outputs (built now if missing), or None without a frozen prefix."""
        if self.cfg.cached and self.cache is None:
            self.cache = build_prefix_cache(self.encoder, self.items, self.tokens, self.cfg,
                                            self.world, self.tmp_dir)  # fmt: skip
        return self.cache

    def encode(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised image and text features of items ``ids``, with gradients."""
        device, cache, k = self.encoder.device, self.prefix_cache(), self.cfg.freeze_layers
        if cache is None:
            images = self.images(ids).to(device)
            tokens = to_device(select_tokens(self.tokens, ids.cpu()), device)
            with autocast(device, self.cfg.precision):
                image, text = self.encoder.encode_images(images), self.encoder.encode_texts(tokens)
        else:
            image_prefix, text_prefix = (cache.rows(m, ids.cpu(), device) for m in MODALITIES)
            with autocast(device, self.cfg.precision):
                image = self.encoder.image_suffix(image_prefix, k)
                text = self.encoder.text_suffix(text_prefix, k)
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
        each process a shard) and let the recommender read them; a prefix cache whose frozen
        weights changed (a load) is rebuilt first."""
        if self.cache is not None and not self.cache.fits(self.encoder):
            log.info("the frozen layers' weights changed: rebuilding the prefix cache")
            self.close()
        image, text = catalogue_features(self.encoder, self.items, self.cfg, self.world,
                                         self.prefix_cache())  # fmt: skip
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

    def close(self) -> None:
        """Drop the prefix cache and remove its files (a later step or refresh rebuilds it)."""
        if self.cache is not None:
            self.cache.close()
            self.cache = None

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
    tmp_dir: str | Path | None = None,
) -> EndToEnd:
    """Freeze the encoder's lower layers, cache their outputs (``cfg.cached``; a cache above
    ``cfg.cache_max_bytes`` is mapped from a folder under ``tmp_dir``), fill the bank with the
    encoder's features and build the registered recommender ``name`` on them (seed torch first
    for reproducibility), starting from the trained state ``init`` when given."""
    world = world or World()
    items = catalogue(items, data.n_items)
    frozen = encoder.freeze_lower_layers(cfg.freeze_layers)
    log.info("end to end: %s with %s %s (%d tensors frozen)", name, encoder.name, encoder.arch,
             frozen)  # fmt: skip
    encoder.to(device)
    tokens = encoder.tokenize(items.column("text").to_pylist())
    cache = build_prefix_cache(encoder, items, tokens, cfg, world, tmp_dir) if cfg.cached else None
    image, text = catalogue_features(encoder, items, cfg, world, cache)
    bank = ItemFeatures(image=torch.from_numpy(image), text=torch.from_numpy(text))
    recommender = get_recommender(name).build(data, bank, model_config)
    if not recommender.uses_features:
        raise ValueError(f"{name} reads no item features: there is nothing to train end to end")
    recommender.set_item_features(bank)  # fails early for a model that cannot swap them
    if init is not None:
        warm_start(recommender, init)
    return EndToEnd(data, recommender, encoder, items, bank, cfg, world, cache, tokens, tmp_dir)


def train_end_to_end(
    model: EndToEnd,
    data: InteractionData,
    train_cfg: TrainConfig,
    out_dir: str | Path,
    checkpoint_path: str | Path | None = None,
) -> dict[str, Any]:
    """``train`` the end-to-end model (in its processes); rank 0 also writes the encoder of the
    best epoch to ``out_dir/encoder`` (a weights folder), replaced together with the trainer's
    outputs. The prefix cache is removed after."""

    def save_encoder(path: Path) -> None:
        encoder = model.encoder
        encoder.source = f"{encoder.source}; trained end to end with {model.recommender.name}"
        encoder.pretrained = f"{encoder.pretrained}+e2e:{model.recommender.name}"
        encoder.save(path)

    outputs = {ENCODER_DIR: save_encoder}
    try:
        metrics = train(model, data, train_cfg, out_dir, checkpoint_path, model.world, outputs)
    finally:
        model.close()
    log.info("%s end to end: %s", model.name, metrics)
    return metrics


def run_end_to_end(
    model: str,
    encoder_name: str,
    items: Path,
    interactions: Path,
    weights: Path,
    out: Path,
    cfg: E2EConfig,
    train_cfg: TrainConfig,
    model_config: Mapping[str, Any] | Any | None,
    checkpoint: Path | None = None,
    init: Path | None = None,
) -> dict[str, Any]:
    """The e2e stage's run: recommender ``model`` trained end to end with the ``encoder_name``
    weights in ``weights`` on the items and interactions files; writes ``out``. With
    ``cfg.warm_start`` the recommender starts from ``init`` (its run on the pretrained
    features with the same training seed). Under ``torchrun --nproc_per_node N`` the
    processes share each batch and rank 0 writes. A prefix cache too large for memory is
    mapped from a folder next to ``checkpoint`` (else in the system's temporary folder) and
    removed at the end."""
    table = read_table(items, ITEMS, "items")
    require_raw_items(items, table, f"e2e {model} with {encoder_name}")
    card = read_card(weights)
    if card["encoder"] != encoder_name:
        raise ValueError(
            f"encoder = {encoder_name!r}, but {weights} holds {card['encoder']!r} weights"
        )
    if not get_recommender(model).uses_features:
        raise ValueError(f"{model} is ID-only: there is no encoder to train with it")
    state = None
    if cfg.warm_start:
        if init is None or not init.is_file():
            raise ValueError(
                f"e2e.warm_start is true, but the recommender state --init {init} does not exist "
                "(train the model on the pretrained features first, or set it false)"
            )
        state = torch.load(init, map_location="cpu", weights_only=True)
    data = load_interactions(interactions)
    encoder = load_encoder(weights)
    with process_group() as current, deterministic():
        seed_everything(train_cfg.seed)
        device = current.device(resolve_device(train_cfg.device))
        tmp_dir = None if checkpoint is None else checkpoint.parent  # the run's own temp folder
        built = build_end_to_end(
            model, data, encoder, table, model_config, cfg, device, current, state, tmp_dir
        )
        metrics = train_end_to_end(built, data, train_cfg, out, checkpoint)
    log.info("%s end to end with %s: %s", model, encoder_name, metrics)
    return metrics
