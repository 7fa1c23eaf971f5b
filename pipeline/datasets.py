"""The datasets lmmrec knows: the offline demo shop and three Amazon 2014 categories."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetInfo:
    """Where a dataset's raw files come from and what they are called."""

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


def get_dataset(name: str) -> DatasetInfo:
    """Look up a dataset by name; an unknown name lists the known ones."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; allowed: {sorted(DATASETS)}") from None
