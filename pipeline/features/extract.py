"""Item feature extraction: every item's image and text through an encoder, into the store.

Images are decoded from the items table's JPEG bytes by a DataLoader, texts are encoded in
batches of similar length, under ``inference_mode`` (bf16 autocast on GPU); under torchrun each
process encodes a shard. ``extract_feature_set`` is the extract stage's whole work: the feature
set's name must match the weights it is made from, and the baseline's set may come from
elsewhere (Amazon's published CNN features, a prepared source's own features).
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline.core.distributed import World, gather_rows, resolve_device
from pipeline.core.distributed import world as process_group
from pipeline.data.cnn_features import published_image_features
from pipeline.data.prepared import PreparedFeatures, read_prepared, require_raw_items
from pipeline.data.schemas import ITEMS, ContractError, check_item_rows, read_table, remedy
from pipeline.encoders import load_encoder, read_card
from pipeline.encoders.base import BASELINE, Encoder, autocast, check_precision, to_device
from pipeline.features.names import feature_set_of
from pipeline.features.store import write_feature_store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractConfig:
    """How item features are computed."""

    batch_size: int = 128  # items per forward pass
    num_workers: int = 0  # DataLoader processes decoding JPEGs (0: in the main process; on CPU
    # decoding is a small share and workers only compete with the model for the cores)
    normalize: bool = True  # L2-normalise every vector (inner product = cosine)
    precision: str = "auto"  # auto (bf16 on CUDA, exact fp32 on CPU) | fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda | cuda:<n>


def decode_image(blob: bytes, transform: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor:
    """One JPEG blob, decoded to RGB and preprocessed by the encoder's ``transform``."""
    with Image.open(io.BytesIO(blob)) as img:
        return transform(img.convert("RGB"))


class _JpegDataset(Dataset):
    """Decodes JPEG bytes and applies the encoder's image transform (runs in worker processes).

    Reads each blob from the Arrow column when asked, so the JPEGs are never copied into
    Python objects all at once (a second copy of the catalogue's images)."""

    def __init__(self, blobs: pa.ChunkedArray, transform) -> None:
        self.blobs, self.transform = blobs, transform

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, i: int) -> torch.Tensor:
        return decode_image(self.blobs[i].as_py(), self.transform)


def _finish(batches: list[torch.Tensor], normalize: bool) -> np.ndarray:
    return finish(torch.cat(batches).float(), normalize)


def finish(vectors: torch.Tensor, normalize: bool) -> np.ndarray:
    """Float32 vectors [N, D] as numpy, L2-normalised when ``normalize``."""
    return (F.normalize(vectors, dim=-1) if normalize else vectors).numpy()


def _extract_images(
    encoder: Encoder, blobs: pa.ChunkedArray, cfg: ExtractConfig, device: torch.device
) -> np.ndarray:
    loader = DataLoader(
        _JpegDataset(blobs, encoder.image_transform),
        batch_size=cfg.batch_size,
        shuffle=False,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),  # its own: iterating must not draw from the global one
    )
    out = []
    with tqdm(total=len(blobs), desc="image features", unit="item", disable=None) as bar:
        for x in loader:
            with autocast(device, cfg.precision):
                out.append(encoder.encode_images(x.to(device, non_blocking=True)).float().cpu())
            bar.update(len(x))
    return _finish(out, cfg.normalize)


def _extract_texts(
    encoder: Encoder, texts: Sequence[str], cfg: ExtractConfig, device: torch.device
) -> np.ndarray:
    """Texts in batches of similar length (less padding for dynamic-length tokenizers)."""
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = []
    with tqdm(total=len(texts), desc="text features", unit="item", disable=None) as bar:
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            tokens = to_device(encoder.tokenize([texts[i] for i in idx]), device)
            with autocast(device, cfg.precision):
                out.append(encoder.encode_texts(tokens).float().cpu())
            bar.update(len(idx))
    features = _finish(out, cfg.normalize)
    restored = np.empty_like(features)
    restored[order] = features
    return restored


def extract_features(
    encoder: Encoder,
    items: pa.Table,
    cfg: ExtractConfig = ExtractConfig(),
    images: bool = True,
    world: World | None = None,
    everywhere: bool = False,
) -> tuple[np.ndarray | None, np.ndarray]:
    """Encode every item's ``image_bytes`` and ``text``: image [N, D_i], text [N, D_t] float32.

    Rows follow ``items``' order. The encoder is moved to ``cfg.device`` and run in eval mode
    under ``torch.inference_mode``; its train/eval mode is restored afterwards. With
    ``images=False`` only texts are encoded and the image result is None (for image features
    that come from elsewhere, such as Amazon's published CNN features). Under torchrun
    (``world.size`` > 1) each rank encodes its shard of the items and rank 0 gets them all;
    the other ranks get (None, None), or all of them too with ``everywhere``.
    """
    world = world or World()
    if cfg.batch_size < 1 or cfg.num_workers < 0:
        raise ValueError(f"bad extract config {cfg}: need batch_size >= 1, num_workers >= 0")
    check_precision(cfg.precision)
    missing = [c for c in ("image_bytes", "text") if c not in items.column_names]
    if missing:
        raise ContractError(f"items table lacks columns {missing} (has {items.column_names})")
    device = world.device(resolve_device(cfg.device))
    n = len(items)
    rows = world.shard(n)
    shard = items.slice(rows.start, rows.stop - rows.start)
    was_training = encoder.training
    encoder.to(device).eval()
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            image = None
            if images:
                image = _extract_images(encoder, shard.column("image_bytes"), cfg, device)
            text = _extract_texts(encoder, shard.column("text").to_pylist(), cfg, device)
    finally:
        encoder.train(was_training)
    if world.size > 1:
        image = None if image is None else gather_rows(image, world, n, everywhere)
        text = gather_rows(text, world, n, everywhere)
    seconds = time.perf_counter() - start
    where = f" (rank {world.rank} of {world.size}: items {rows.start}-{rows.stop - 1})"
    log.info(
        "extracted %d items with %s/%s in %.1fs (%.0f items/s)%s",
        len(shard), encoder.name, encoder.arch, seconds, len(shard) / max(seconds, 1e-9),
        where if world.size > 1 else "",
    )  # fmt: skip
    return image, text


def feature_metadata(encoder: Encoder, items: pa.Table, cfg: ExtractConfig) -> dict:
    """The schema metadata of a feature set made by ``extract_features(encoder, items, cfg)``."""
    return {
        "encoder": encoder.name,
        "arch": encoder.arch,
        "pretrained": encoder.pretrained,
        "weights_sha256": encoder.weights_sha256,
        "normalized": cfg.normalize,
        "precision": cfg.precision,
        "aligned": encoder.aligned,
        "n_items": len(items),
        "n_with_image": int(pc.sum(items.column("has_image")).as_py() or 0),
    }


def extract_feature_set(
    feature_set: str,
    items: Path,
    weights: Path,
    out: Path,
    cfg: ExtractConfig = ExtractConfig(),
    published: Path | None = None,
    prepared: Path | None = None,
) -> None:
    """Encode the items in ``items`` with the weights in ``weights`` into the feature store
    ``out``. Under ``torchrun --nproc_per_node N`` each process encodes a shard and rank 0
    writes.

    For ``cnn_st``, the image features are Amazon's published CNN vectors when ``published``
    (preprocess's image_features.parquet) has any, mean-filled for the items without one; and
    when ``prepared`` (preprocess's prepared_features.parquet) has rows, the set is a prepared
    source's own features, stored as given (nothing is encoded, ``weights`` is not read).
    """
    table = read_table(items, ITEMS, "items")
    item_ids = table.column("item_id").to_numpy()
    given_features = None if prepared is None else read_prepared(prepared)
    if given_features is not None and feature_set == BASELINE:
        _store_prepared(given_features, prepared, item_ids, out)
        return
    require_raw_items(items, table, f"extract {feature_set}")
    expected = feature_set_of(read_card(weights))
    if feature_set != expected:
        raise ValueError(
            f"feature set {feature_set!r} cannot be made from {weights}, which holds the "
            f"weights of feature set {expected!r}"
        )
    encoder = load_encoder(weights)
    metadata = {**feature_metadata(encoder, table, cfg), "feature_set": feature_set}
    given = None
    if feature_set == BASELINE and published is not None:
        given = published_image_features(published, item_ids)
    with process_group() as current:  # under torchrun: a shard of the items per rank
        image, text = extract_features(encoder, table, cfg, given is None, current)
    if not current.is_main:
        return  # rank 0 writes
    if given is not None:
        vectors, found = given
        image = finish(torch.from_numpy(vectors), cfg.normalize)
        metadata.update(image_source="amazon published CNN features (.b), mean-filled",
                        n_image_features_found=int(found.sum()))  # fmt: skip
    write_feature_store(out, item_ids, image, text, metadata)
    log.info("extract %s: %d items -> %s", feature_set, table.num_rows, out)


def _store_prepared(given: PreparedFeatures, path: Path, item_ids: np.ndarray, out: Path) -> None:
    """The cnn_st set from a prepared source's features (as given: MMRec's models read them
    unnormalised); the metadata names the source and its files' hashes."""
    check_item_rows(given.item_ids, len(item_ids), str(path), remedy("prepared_features"))
    source = given.metadata.get("source", "?")
    metadata = {
        "encoder": BASELINE,
        "arch": f"{source} prepared features",
        "pretrained": f"{source}: image_feat.npy + text_feat.npy",
        "weights_sha256": {k: v["sha256"] for k, v in given.metadata.get("files", {}).items()},
        "normalized": bool(given.metadata.get("normalized", False)),
        "aligned": False,
        "n_items": len(item_ids),
        "feature_set": BASELINE,
        "source": source,
        "image_source": f"{source} image_feat.npy, as given",
        "text_source": f"{source} text_feat.npy, as given",
    }
    write_feature_store(out, given.item_ids, given.image, given.text, metadata)
    log.info("extract %s: %d items from %s's prepared features -> %s",
             BASELINE, len(item_ids), source, out)  # fmt: skip
