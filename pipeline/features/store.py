"""Item feature extraction and the feature store: one Parquet file plus two FAISS indexes.

A feature set folder ``features/<dataset>/<feature_set>/`` holds

- ``items.parquet``: one row per item, ``item_id`` int32, ``image`` and ``text`` as fixed-size
  lists of float32 (``pipeline.data.schemas.feature_schema``). The schema metadata records the
  encoder, arch, pretrained tag, weights sha256, dims, normalisation and how many items have a
  real image; each value is stored JSON-encoded (so numbers and booleans round-trip).
- ``image.faiss`` and ``text.faiss``: exact inner-product indexes (``IndexFlatIP`` inside an
  ``IndexIDMap2``) whose ids are the ``item_id`` values, so a search returns item ids directly,
  whatever their order. On L2-normalised vectors the inner product is the cosine similarity.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline.core.atomic import atomic_path
from pipeline.core.distributed import World, gather_rows
from pipeline.data.schemas import (
    ContractError,
    check_item_rows,
    feature_schema,
    read_parquet,
    validate,
)
from pipeline.encoders.base import Encoder, autocast, check_precision, resolve_device, to_device

log = logging.getLogger(__name__)

ITEMS_FILE = "items.parquet"
MODALITIES = ("image", "text")
REQUIRED_METADATA = ("encoder", "arch", "pretrained", "weights_sha256", "normalized")


@dataclass(frozen=True)
class ExtractConfig:
    """How item features are computed."""

    batch_size: int = 128  # items per forward pass
    num_workers: int = 0  # DataLoader processes decoding JPEGs (0: in the main process; on CPU
    # decoding is a small share and workers only compete with the model for the cores)
    normalize: bool = True  # L2-normalise every vector (inner product = cosine)
    precision: str = "auto"  # auto (bf16 on CUDA, exact fp32 on CPU) | fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda | cuda:<n>


@dataclass(frozen=True)
class FeatureSet:
    """A feature set read back: ``image`` [N, D_i] and ``text`` [N, D_t] float32, row i is
    item ``item_ids[i]``; ``metadata`` is the decoded schema metadata."""

    item_ids: np.ndarray
    image: np.ndarray
    text: np.ndarray
    metadata: dict


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


def _faiss_index(item_ids: np.ndarray, vectors: np.ndarray) -> faiss.Index:
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    index.add_with_ids(np.ascontiguousarray(vectors), item_ids.astype(np.int64))
    return index


def write_feature_store(
    out_dir: str | Path,
    item_ids: np.ndarray,
    image: np.ndarray,
    text: np.ndarray,
    metadata: dict,
) -> None:
    """Write ``items.parquet``, ``image.faiss`` and ``text.faiss`` into ``out_dir`` atomically.

    ``metadata`` must hold at least ``REQUIRED_METADATA``; ``image_dim``/``text_dim`` are added.
    """
    item_ids = np.asarray(item_ids)
    image = np.asarray(image, dtype=np.float32)
    text = np.asarray(text, dtype=np.float32)
    n = len(item_ids)
    if item_ids.ndim != 1 or image.ndim != 2 or text.ndim != 2 or len(image) != n or len(text) != n:
        raise ValueError(
            f"need item_ids [N], image [N, D_i], text [N, D_t]; got shapes "
            f"{item_ids.shape}, {image.shape}, {text.shape}"
        )
    if len(np.unique(item_ids)) != n:
        raise ValueError("item_ids are not unique")
    if not (np.isfinite(image).all() and np.isfinite(text).all()):
        raise ValueError("features contain NaN or inf")
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise ValueError(f"feature metadata lacks {missing}; required: {list(REQUIRED_METADATA)}")
    meta = {**metadata, "image_dim": image.shape[1], "text_dim": text.shape[1]}
    schema = feature_schema(
        image.shape[1], text.shape[1], {k: json.dumps(v) for k, v in meta.items()}
    )
    table = pa.table(
        {
            "item_id": pa.array(item_ids, pa.int32()),
            "image": pa.FixedSizeListArray.from_arrays(pa.array(image.ravel()), image.shape[1]),
            "text": pa.FixedSizeListArray.from_arrays(pa.array(text.ravel()), text.shape[1]),
        }
    )
    table = validate(table, schema, "feature store").replace_schema_metadata(schema.metadata)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        pq.write_table(table, tmp / ITEMS_FILE)
        for name, vectors in (("image", image), ("text", text)):
            faiss.write_index(_faiss_index(item_ids, vectors), str(tmp / f"{name}.faiss"))
    log.info(
        "wrote %d items' features (%d + %d dims) to %s", n, image.shape[1], text.shape[1], out_dir
    )


def _to_numpy(column: pa.ChunkedArray, dim: int) -> np.ndarray:
    flat = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return flat.astype(np.float32, copy=False).reshape(-1, dim)


def read_feature_store(feature_dir: str | Path, n_items: int | None = None) -> FeatureSet:
    """Read and validate a feature set folder's ``items.parquet``; a missing, damaged or
    truncated file raises naming it. With ``n_items`` (the interactions'), its item ids must
    be exactly 0..n_items-1."""
    path = Path(feature_dir) / ITEMS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (has the extract stage run?)")
    todo = f"(re)create it with `dvc repro extract@{path.parent.name}`"
    table = read_parquet(path, todo)
    file_schema = table.schema
    dims = {}
    for name in MODALITIES:
        if name not in file_schema.names or not pa.types.is_fixed_size_list(
            file_schema.field(name).type
        ):
            raise ContractError(f"{path}: column {name!r} is missing or not a fixed-size list")
        dims[name] = file_schema.field(name).type.list_size
    table = validate(table, feature_schema(dims["image"], dims["text"], {}), str(path))
    metadata = {k.decode(): json.loads(v) for k, v in (file_schema.metadata or {}).items()
                if not k.startswith(b"ARROW:")}  # fmt: skip
    for name in MODALITIES:
        if metadata.get(f"{name}_dim") != dims[name]:
            raise ContractError(f"{path}: metadata {name}_dim disagrees with the {name} column")
    item_ids = table.column("item_id").to_numpy()
    if n_items is not None:
        check_item_rows(item_ids, n_items, str(path), todo)
    elif len(np.unique(item_ids)) != len(item_ids):
        raise ContractError(f"{path}: item_id repeats ids; each item needs one row: {todo}")
    return FeatureSet(
        item_ids=item_ids,
        image=_to_numpy(table.column("image"), dims["image"]),
        text=_to_numpy(table.column("text"), dims["text"]),
        metadata=metadata,
    )


def nearest_items(
    feature_dir: str | Path, item_id: int, modality: str = "image", k: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` items most similar to ``item_id`` in one modality (itself excluded).

    Returns item ids [k] (int64) and their inner-product scores [k] (float32), best first.
    """
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; allowed: {list(MODALITIES)}")
    index = faiss.read_index(str(Path(feature_dir) / f"{modality}.faiss"))
    try:
        query = index.reconstruct(int(item_id))[None, :]
    except RuntimeError:
        raise KeyError(
            f"item_id {item_id} is not in the {modality} index of {feature_dir}"
        ) from None
    scores, ids = index.search(query, min(k + 1, index.ntotal))
    keep = (ids[0] != item_id) & (ids[0] >= 0)
    return ids[0][keep][:k], scores[0][keep][:k]
