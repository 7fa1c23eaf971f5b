"""Looking into feature sets (``lmmrec features show | neighbours | compare``): a set's schema
and metadata, an item's nearest items by image and by text, image-text alignment per set.
Each returns the lines to print."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from pipeline.features.alignment import alignment, separate_spaces
from pipeline.features.store import ITEMS_FILE, MODALITIES, nearest_items, read_feature_store


def folders(path: Path) -> list[str]:
    """The visible sub-folders of ``path`` (none if it does not exist), sorted."""
    if not path.is_dir():
        return []
    return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def show(folder: Path, rows: int = 5) -> list[str]:
    """A feature set's size, schema, metadata and a polars preview of ``rows`` rows."""
    store = read_feature_store(folder)
    frame = pl.read_parquet(folder / ITEMS_FILE)
    lines = [f"{folder}: {frame.height} items", f"schema: {dict(frame.schema)}"]
    lines += [f"  {key}: {value}" for key, value in sorted(store.metadata.items())]
    return [*lines, str(frame.head(rows))]


def neighbours(root: Path, dataset: str, feature_set: str, item: int, k: int = 10) -> list[str]:
    """An item's title, then its ``k`` nearest items by image and by text (FAISS), with titles;
    ``root`` holds features/ and data/processed/."""
    store = root / "features" / dataset
    folder = store / feature_set
    items_file = root / "data" / "processed" / dataset / "items.parquet"
    if not store.is_dir():
        datasets = folders(root / "features")
        raise FileNotFoundError(f"unknown dataset {dataset!r}: {root / 'features'} has {datasets}")
    if not (folder / ITEMS_FILE).is_file():
        sets = folders(store)
        raise FileNotFoundError(f"unknown feature set {feature_set!r}: {store} has {sets}")
    if k < 1:
        raise ValueError(f"k = {k}; use k >= 1")
    ids = pq.read_table(folder / ITEMS_FILE, columns=["item_id"]).column("item_id").to_numpy()
    if item not in set(ids.tolist()):
        raise ValueError(
            f"item {item} is not in {folder}: it holds {len(ids)} items, "
            f"ids {ids.min()}..{ids.max()}"
        )
    if not items_file.is_file():
        raise FileNotFoundError(f"{items_file} not found (titles): run `dvc repro preprocess`")
    table = pq.read_table(items_file, columns=["item_id", "title"])
    titles = dict(zip(*(table.column(c).to_pylist() for c in ("item_id", "title")), strict=True))
    normalized = (pq.read_schema(folder / ITEMS_FILE).metadata or {}).get(b"normalized")
    score = "cosine" if normalized == b"true" else "inner product"
    found = {m: nearest_items(folder, item, m, k) for m in MODALITIES}
    lines = [f"{folder}, item {item}: {titles.get(item, '?')}"]
    for modality, (near, scores) in found.items():
        lines.append(f"nearest by {modality} ({score}):")
        for rank, (other, value) in enumerate(zip(near.tolist(), scores.tolist(), strict=True), 1):
            lines.append(f"  {rank:>3}. {other:>7}  {value:8.4f}  {titles.get(other, '?')}")
    return lines


def compare_alignment(root: Path, dataset: str, feature_sets: Sequence[str] = ()) -> list[str]:
    """Image-text alignment of each of ``feature_sets`` (default: every set of ``dataset``
    under ``root``/features): matched vs mismatched cosine and retrieval recall, as a table;
    sets whose image and text vectors live in separate spaces say why they are not scored."""
    store = root / "features" / dataset
    rows = []
    if not store.is_dir():
        datasets = folders(root / "features")
        raise FileNotFoundError(f"unknown dataset {dataset!r}: {root / 'features'} has {datasets}")
    existing = folders(store)
    unknown = [name for name in feature_sets if name not in existing]
    if unknown:
        raise FileNotFoundError(f"unknown feature sets {unknown}: {store} has {existing}")
    if not (feature_sets or existing):
        raise FileNotFoundError(f"{store} holds no feature sets: run `dvc repro extract`")
    for name in feature_sets or existing:
        path = store / name / ITEMS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist (has the extract stage run?)")
        raw = pq.read_schema(path).metadata or {}
        meta = {k.decode(): json.loads(v) for k, v in raw.items() if not k.startswith(b"ARROW:")}
        why = separate_spaces(meta, meta.get("image_dim"), meta.get("text_dim"))
        if why:
            rows.append((name, pq.read_metadata(path).num_rows, why))
        else:
            features = read_feature_store(store / name)
            rows.append((name, len(features.item_ids), alignment(features.image, features.text)))
    lines = [
        f"{store}: image-text alignment. cos = mean cosine similarity of matched pairs "
        "(image_i, text_i) and of all mismatched pairs (image_i, text_j), i != j; "
        "R@k = retrieval of the paired item among all items (i2t: image -> text)."
    ]
    columns = ("matched", "mismatched", "gap", "i2t R@1", "i2t R@10", "t2i R@1", "t2i R@10")
    keys = ("matched_cos", "mismatched_cos", "gap", "i2t_r1", "i2t_r10", "t2i_r1", "t2i_r10")
    width = max(len("feature set"), *(len(name) for name, _, _ in rows))
    lines.append(f"{'feature set':<{width}}  {'items':>6}" + "".join(f"  {c:>10}" for c in columns))
    for name, n, result in rows:
        cells = (
            f"  n/a (separate spaces: {result})"
            if isinstance(result, str)
            else "".join(f"  {result[key]:>10.4f}" for key in keys)
        )
        lines.append(f"{name:<{width}}  {n:>6}{cells}")
    for n in sorted({n for _, n, result in rows if not isinstance(result, str)}):
        lines.append(f"chance with {n} items: R@1 = {1 / n:.4f}, R@10 = {min(10, n) / n:.4f}")
    return lines
