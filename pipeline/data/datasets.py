"""The datasets lmmrec knows: built-in names (the offline demo shop and three Amazon 2014
categories) and the params entries that name a source for any other dataset."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.data.amazon import LineStats, iter_meta, iter_reviews


@dataclass(frozen=True)
class DatasetInfo:
    """Where an Amazon-format dataset's raw files come from and what they are called."""

    name: str
    category: str  # the Amazon 2014 category name used in file names
    synthetic: bool  # True: generated locally by the demo world, never downloaded

    @property
    def reviews_file(self) -> str:
        return f"reviews_{self.category}_5.json.gz"

    @property
    def meta_file(self) -> str:
        return f"meta_{self.category}.json.gz"

    @property
    def image_features_file(self) -> str:
        return f"image_features_{self.category}.b"

    @property
    def publishes_image_features(self) -> bool:
        """Whether the release has an image features file to download (2014: the ``.b``)."""
        return True

    def reviews(self, path: Path, stats: LineStats) -> Iterator[dict]:
        """The reviews file's records, as dicts with reviewerID, asin, overall, unixReviewTime."""
        return iter_reviews(path, stats)

    def meta(self, path: Path, stats: LineStats) -> Iterator[dict]:
        """The metadata file's records, as dicts with asin and (when known) title, brand,
        categories, description and imUrl: the 2014 fields the item text and images use."""
        return iter_meta(path, stats)


DATASETS: dict[str, DatasetInfo] = {
    d.name: d
    for d in (
        DatasetInfo("demo", "Demo", synthetic=True),
        DatasetInfo("baby", "Baby", synthetic=False),
        DatasetInfo("sports", "Sports_and_Outdoors", synthetic=False),
        DatasetInfo("clothing", "Clothing_Shoes_and_Jewelry", synthetic=False),
    )
}

IMAGES_DIR = "images"  # raw images live at data/raw/<dataset>/images/<asin>.jpg
MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class DatasetSpec:
    """One ``datasets.<name>`` entry of the params: which source, and where its files are."""

    source: (
        str  # a source of pipeline.data.sources: demo | amazon2014 | amazon2023 | mmrec | lattice
    )
    category: str = ""  # amazon2014/amazon2023: the release's category; mmrec: <category>.inter
    url: str = ""  # base URL of the files ('' = the source's default; mmrec/lattice have none)
    mirror: str = ""  # a local folder holding the files (downloaded by hand): read, never a URL
    meta: str = ""  # mmrec/lattice: an Amazon 2014 metadata file beside them (meta_Baby.json.gz)

    @property
    def mirror_uri(self) -> str:
        """The mirror folder as a ``file://`` base URL (the fetch code reads it like a server)."""
        return Path(self.mirror).expanduser().resolve().as_uri() + "/"


BUILTIN: dict[str, DatasetSpec] = {
    name: DatasetSpec("demo" if info.synthetic else "amazon2014", info.category)
    for name, info in DATASETS.items()
}


def get_dataset(name: str) -> DatasetInfo:
    """Look up a built-in dataset by name; an unknown name lists the known ones."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; allowed: {sorted(DATASETS)}") from None


def dataset_spec(name: str, entries: Mapping[str, Any] | None) -> DatasetSpec:
    """The spec of dataset ``name``: its ``datasets.<name>`` params entry, else the built-in one."""
    entry = (entries or {}).get(name)
    if entry is not None:
        return entry if isinstance(entry, DatasetSpec) else DatasetSpec(**entry)
    if name in BUILTIN:
        return BUILTIN[name]
    known = sorted({*BUILTIN, *(entries or {})})
    raise ValueError(
        f"unknown dataset {name!r}: neither built in nor listed under `datasets` in the params; "
        f"known: {known}"
    )
