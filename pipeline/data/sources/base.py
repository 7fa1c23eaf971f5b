"""What a dataset source does: check its params entry, fetch its files, write the contract."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pipeline.data.datasets import DatasetSpec
from pipeline.data.download import DownloadConfig
from pipeline.data.preprocess import PreprocessConfig


class Source:
    """One way datasets arrive: a raw release (reviews + metadata + images) or a prepared
    folder (a fixed split with item features). Subclasses register with ``@register_source``."""

    name: ClassVar[str] = ""
    prepared: ClassVar[bool] = False  # ships its own split and item features (.npy)
    needs_category: ClassVar[bool] = False  # file names depend on ``category``
    default_url: ClassVar[str] = ""  # '' = the user must give ``url`` or ``mirror``

    def check(self, dataset: str, spec: DatasetSpec) -> None:
        """Raise ValueError, naming the ``datasets.<dataset>`` key, if ``spec`` cannot work."""
        where = f"datasets.{dataset}"
        if spec.meta and not self.prepared:
            raise ValueError(
                f"{where}.meta: only prepared sources (mmrec, lattice) take a metadata file; "
                f"{self.name} reads its own"
            )
        if self.needs_category and not spec.category:
            raise ValueError(f"{where}.category is empty: {self.name} needs the category name")
        if spec.url and spec.mirror:
            raise ValueError(f"{where}: give url (a server) or mirror (a local folder), not both")
        if spec.url and not spec.url.lower().startswith(("http://", "https://")):
            raise ValueError(
                f"{where}.url = {spec.url!r}: use an http(s) URL; a local folder goes in "
                f"{where}.mirror"
            )
        if not (spec.url or spec.mirror or self.default_url):
            raise ValueError(
                f"{where}: {self.name} has no default location: set url (http(s)) or mirror "
                "(a local folder holding its files)"
            )

    def base_url(self, spec: DatasetSpec) -> str:
        """Where the files are: the mirror folder (as file://), else ``url`` or the default."""
        if spec.mirror:
            mirror = Path(spec.mirror).expanduser()
            if not mirror.is_dir():
                raise FileNotFoundError(f"mirror {spec.mirror!r} is not a folder")
            return spec.mirror_uri
        return (spec.url or self.default_url).rstrip("/") + "/"

    def download(
        self, dataset: str, spec: DatasetSpec, out_dir: Path, cfg: DownloadConfig, demo: Any
    ) -> dict:
        """Make ``out_dir`` hold the raw files (``demo``: the DemoConfig, for the demo only)."""
        raise NotImplementedError

    def preprocess(
        self, dataset: str, spec: DatasetSpec, raw_dir: Path, out_dir: Path, cfg: PreprocessConfig
    ) -> dict:
        """Write the processed contract files from ``raw_dir`` into ``out_dir``; the stats."""
        raise NotImplementedError
