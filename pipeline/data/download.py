"""Download an Amazon 2014 category (reviews, metadata, image features, product images).

Concurrent, retried and resumable: every file is recorded in ``manifest.json`` with its URL,
size, sha256 and status; a re-run fetches only what is missing, changed or failed. Nothing is
recorded ``ok`` unverified: a .gz must decompress, a ``.b`` hold whole records, an image decode.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import urllib.parse
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.core.atomic import write_json
from pipeline.core.fetch import fetch, file_digest, gzip_error
from pipeline.data.amazon import FEATURE_RECORD_BYTES, LineStats
from pipeline.data.datasets import IMAGES_DIR, MANIFEST_FILE, DatasetInfo

log = logging.getLogger(__name__)

SNAP = "http://snap.stanford.edu/data/amazon/productGraph/"
_ASIN = re.compile(r"[A-Za-z0-9_-]+")  # anything else could escape the images folder
# URLs read from downloaded data are fetched over these schemes only: a file:// (or ftp://, data:)
# imUrl must not copy a local file into the images folder. Base URLs set in params may differ.
DATA_URL_SCHEMES = ("http", "https")


@dataclass(frozen=True)
class DownloadConfig:
    """Where the files come from and how hard to try; base URLs are params because mirrors exist."""

    reviews_url: str = SNAP + "categoryFiles/"
    meta_url: str = SNAP + "categoryFiles/"
    image_features_url: str = SNAP + "image_features/categoryFiles/"
    workers: int = 16  # concurrent connections
    retries: int = 5  # retries after the first attempt, per file
    backoff: float = 0.5  # seconds; the k-th retry waits backoff * 2**k
    timeout: float = 60.0  # seconds per connect / read
    images: bool = True  # fetch each reviewed item's imUrl into images/<asin>.jpg
    image_features: bool = True  # fetch image_features_<Category>.b
    max_images: int = 0  # 0 = all; a cap (first asins in sorted order) for quick trials
    retry_dead: bool = False  # try again image URLs an earlier run found dead (404/410)
    manifest_every: int = 100  # rewrite manifest.json after this many finished files

    def __post_init__(self) -> None:
        for name, low in (("workers", 1), ("retries", 0), ("max_images", 0), ("manifest_every", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} = {getattr(self, name)!r} must be >= {low}")
        if self.backoff < 0 or self.timeout <= 0:
            raise ValueError(f"backoff = {self.backoff} must be >= 0, timeout = {self.timeout} > 0")


class DownloadError(RuntimeError):
    """A file the dataset cannot do without (reviews, metadata) could not be downloaded."""


@dataclass(frozen=True)
class _Job:
    url: str
    rel: str  # destination, relative to out_dir, POSIX separators
    required: bool = False
    image: bool = False
    mirrored: bool = False  # the URL is a file in the mirror the params name, not from the data


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def features_error(path: Path) -> str | None:
    """Why a ``.b`` file is not a run of whole records (ASIN + 4096 float32), or None if it is."""
    size = path.stat().st_size
    if size == 0 or size % FEATURE_RECORD_BYTES:
        return (
            f"image features file of {size} bytes is not a whole number of "
            f"{FEATURE_RECORD_BYTES}-byte records (truncated or not a .b file)"
        )
    return None


def image_error(path: Path) -> str | None:
    """Why an image file does not decode to the last pixel, or None if it does."""
    try:
        with Image.open(path) as img:
            img.load()
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ...) on bad data
        return f"image does not decode ({type(exc).__name__}: {exc})"
    return None


def npy_error(path: Path) -> str | None:
    """Why a ``.npy`` file is not a readable 2-d numeric array (no pickles), or None if it is."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        return f"not a readable .npy array ({exc})"
    if array.ndim != 2 or array.dtype.kind not in "fiu":
        return f".npy holds a {array.dtype} array of shape {array.shape}, not a 2-d numeric one"
    return None


def _content_error(job: _Job, path: Path) -> str | None:
    """Why ``path``, meant as ``job``'s file, is unusable (checked by its kind), or None."""
    if job.image:
        return image_error(path)
    if job.rel.endswith(".gz"):
        return gzip_error(path)
    if job.rel.endswith(".b"):
        return features_error(path)
    if job.rel.endswith(".npy"):
        return npy_error(path)
    return None


def _entry(
    job: _Job,
    status: str,
    size: int | None = None,
    digest: str | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    path = job.rel if status == "ok" else None
    return {
        "url": job.url,
        "path": path,
        "bytes": size,
        "sha256": digest,
        "status": status,
        "error": error,
    }


def _obtain(
    job: _Job, old: dict | None, out_dir: Path, cfg: DownloadConfig, stop: threading.Event
) -> tuple[dict[str, Any], bool]:
    """Make ``job``'s file present: keep a recorded copy, adopt a verified one, or fetch it.

    Returns the manifest entry and whether the file was already there (no request made). Only
    images are remembered dead (not requested again without ``retry_dead``); reviews, metadata
    and image features are requested on every run until they arrive.
    """
    dest = out_dir / job.rel
    same = old is not None and old["url"] == job.url
    if dest.is_file():
        size, digest = file_digest(dest)
        if same and old["status"] == "ok":
            if (old["bytes"], old["sha256"]) == (size, digest):
                return _entry(job, "ok", size, digest), True
            log.warning("%s does not match its manifest entry; fetching it again", dest)
        elif old is not None and not same:
            log.warning("%s was fetched from another URL; fetching it again", dest)
        elif problem := _content_error(job, dest):
            log.warning("%s found on disk is unusable (%s); fetching it again", dest, problem)
        else:
            log.info("adopting %s found on disk (verified, not recorded as ok before)", dest)
            return _entry(job, "ok", size, digest), True
        dest.unlink()
    if job.image and same and old["status"] == "dead" and not cfg.retry_dead:
        return dict(old), False
    got = fetch(
        job.url,
        dest,
        retries=cfg.retries,
        backoff=cfg.backoff,
        timeout=cfg.timeout,
        stop=stop,
        check=lambda path: _content_error(job, path),
    )
    if got.status != "ok":
        level = logging.INFO if got.status == "dead" else logging.WARNING
        log.log(level, "%s %s: %s", got.status, job.url, got.error)
    return _entry(job, got.status, got.bytes, got.sha256, got.error), False


class _Manifest:
    """manifest.json: the previous run's entries, this run's, and atomic rewrites of both."""

    def __init__(self, out_dir: Path, dataset: str) -> None:
        self.path = out_dir / MANIFEST_FILE
        self.dataset = dataset
        self.previous: list[dict] = []
        self.current: dict[str, dict] = {}  # rel -> entry, in plan order once planned
        self.order: list[str] = []
        self._by_path: dict[str, dict] = {}
        self._by_url: dict[str, dict] = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                log.warning(
                    "ignoring unreadable %s (%s); files on disk are re-checked", self.path, exc
                )
                return
            if data.get("dataset") != dataset:
                raise DownloadError(
                    f"{self.path} belongs to dataset {data.get('dataset')!r}, not {dataset!r}; "
                    "use a separate folder per dataset"
                )
            self.previous = list(data.get("files", []))
            self._by_path = {e["path"]: e for e in self.previous if e.get("path")}
            self._by_url = {e["url"]: e for e in self.previous if not e.get("path")}

    def old(self, job: _Job) -> dict | None:
        """The previous run's entry for ``job``: by destination, else a pathless one by URL."""
        return self._by_path.get(job.rel) or self._by_url.get(job.url)

    def plan(self, job: _Job) -> None:
        self.order.append(job.rel)

    def record(self, job: _Job, entry: dict) -> None:
        self.current[job.rel] = entry

    def save(self) -> None:
        files = [self.current[rel] for rel in self.order if rel in self.current]
        urls = {e["url"] for e in files}
        files += [
            e
            for e in self.previous
            if not (e.get("path") in self.current or (not e.get("path") and e["url"] in urls))
        ]
        write_json(self.path, {"dataset": self.dataset, "files": files})


def _count(counts: Counter[str], entry: dict[str, Any], skipped: bool) -> None:
    """Add one file's outcome to ``counts``: its status (or ``skipped``) and the bytes fetched."""
    counts["skipped" if skipped else entry["status"]] += 1
    if entry["status"] == "ok" and not skipped:
        counts["bytes"] += entry["bytes"]


def _image_jobs(
    out_dir: Path, info: DatasetInfo, cfg: DownloadConfig, mirror: Path | None
) -> tuple[list[_Job], int]:
    """One job per reviewed item with an imUrl (sorted by asin, capped); plus how many lack one.

    An item whose ``<mirror>/images/<asin>.jpg`` exists is read from there instead."""
    stats = LineStats()
    asins = {r["asin"] for r in info.reviews(out_dir / info.reviews_file, stats)}
    meta_stats = LineStats()
    urls: dict[str, str] = {}
    for rec in info.meta(out_dir / info.meta_file, meta_stats):
        url = rec.get("imUrl")
        if rec["asin"] in asins and isinstance(url, str) and url.strip():
            urls[rec["asin"]] = url.strip()
    for name, st in (("reviews", stats), ("metadata", meta_stats)):
        if st.malformed:
            log.warning("%s: skipped %d malformed lines, e.g. %s", name, st.malformed, st.examples)
    bad = sorted(a for a in urls if not _ASIN.fullmatch(a))
    if bad:
        log.warning("skipping %d asins unusable as file names, e.g. %r", len(bad), bad[:3])
    chosen = sorted(a for a in urls if _ASIN.fullmatch(a))
    if cfg.max_images:
        chosen = chosen[: cfg.max_images]
    jobs = []
    for asin in chosen:
        local = None if mirror is None else mirror / IMAGES_DIR / f"{asin}.jpg"
        rel = f"{IMAGES_DIR}/{asin}.jpg"
        if local is not None and local.is_file():
            jobs.append(_Job(local.resolve().as_uri(), rel, image=True, mirrored=True))
        else:
            jobs.append(_Job(urls[asin], rel, image=True))
    return jobs, len(asins) - len(urls)


def refused_scheme(url: str) -> str | None:
    """Why ``url``, read from downloaded data, must not be fetched; None when it is http(s)."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in DATA_URL_SCHEMES:
        return None
    return (
        f"refused: scheme {scheme or '(none)'!r}; URLs read from downloaded data are fetched "
        f"over {' or '.join(DATA_URL_SCHEMES)} only"
    )


def _remove_leftovers(out_dir: Path) -> None:
    """Delete .part files and manifest temporaries that a killed run left behind."""
    for folder in (out_dir, out_dir / IMAGES_DIR):
        for leftover in (*folder.glob("*.part"), *folder.glob(f".{MANIFEST_FILE}.tmp-*")):
            leftover.unlink(missing_ok=True)


def download_dataset(
    info: DatasetInfo, out_dir: Path, cfg: DownloadConfig, mirror: Path | None = None
) -> dict[str, Any]:
    """Fetch ``info``'s raw files into ``out_dir`` and keep ``manifest.json`` current; resumable.

    With ``mirror`` (a local folder the user names in the params), an item's image is read
    from ``<mirror>/images/<asin>.jpg`` when that file exists; every other image URL, read from
    the metadata, is fetched over http(s) only. (The caller points the base URLs of reviews,
    metadata and image features at the mirror.)

    Reviews and metadata are required (``DownloadError`` names the URL and the last error, and a
    re-run requests them again); image features and images that fail are recorded, never fatal.
    Returns counts: ``ok`` (fetched now), ``skipped`` (already present), ``dead``, ``failed``,
    ``bytes`` (fetched now), ``images`` (planned), ``no_image_url`` (reviewed items without an
    imUrl) and ``refused`` (imUrls that are not http(s), recorded in the manifest as "refused"
    and never opened). Dead images are logged with how to retry them (``retry_dead``).
    """
    if info.synthetic:
        raise ValueError(f"dataset {info.name!r} is generated locally, not downloaded")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out_dir)
    manifest = _Manifest(out_dir, info.category)
    core = [
        _Job(_join(cfg.reviews_url, info.reviews_file), info.reviews_file, required=True),
        _Job(_join(cfg.meta_url, info.meta_file), info.meta_file, required=True),
    ]
    if cfg.image_features and info.publishes_image_features:
        features = info.image_features_file
        core.append(_Job(_join(cfg.image_features_url, features), features))
    counts: Counter[str] = Counter()
    stop = threading.Event()
    pool = ThreadPoolExecutor(cfg.workers, thread_name_prefix="download")
    pending: dict[Future, _Job] = {}

    def submit(jobs: Iterable[_Job]) -> None:
        for job in jobs:
            manifest.plan(job)
            pending[pool.submit(_obtain, job, manifest.old(job), out_dir, cfg, stop)] = job

    def collect(fut: Future) -> dict[str, Any]:
        job = pending.pop(fut)
        entry, skipped = fut.result()
        manifest.record(job, entry)
        _count(counts, entry, skipped)
        if len(manifest.current) % cfg.manifest_every == 0:
            manifest.save()
        return entry

    try:
        submit(core)
        for fut, job in list(pending.items()):
            if job.required and (entry := collect(fut))["status"] != "ok":
                raise DownloadError(
                    f"could not download {job.url}: {entry['error']}; no image was fetched. "
                    "This failure is not remembered: running the download again requests it again"
                )
        jobs, no_url = _image_jobs(out_dir, info, cfg, mirror) if cfg.images else ([], 0)
        allowed = [job for job in jobs if job.mirrored or not refused_scheme(job.url)]
        refused = [job for job in jobs if not job.mirrored and refused_scheme(job.url)]
        for job in refused:
            manifest.plan(job)
            manifest.record(job, _entry(job, "refused", error=refused_scheme(job.url)))
        if refused:
            examples = [job.url for job in refused[:3]]
            log.warning(
                "refused %d image URLs that are not http(s), e.g. %s", len(refused), examples
            )
        counts["refused"] = len(refused)
        submit(allowed)
        with tqdm(total=len(allowed), unit="file", desc="images", disable=None) as bar:
            for fut in as_completed(list(pending)):
                job = pending[fut]
                entry = collect(fut)
                if job.image:
                    if entry["status"] != "ok":
                        bar.set_postfix(dead=counts["dead"], failed=counts["failed"], refresh=False)
                    bar.update()
    finally:
        if pending:
            stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        for fut in [f for f in pending if f.done() and not f.cancelled() and not f.exception()]:
            collect(fut)
        manifest.save()
    if counts["dead"]:
        log.warning(
            "%d image URLs are dead (HTTP 404/410): recorded in %s and not requested again; "
            "set download.retry_dead: true in the params to try them again",
            counts["dead"],
            manifest.path,
        )
    summary = {k: counts[k] for k in ("ok", "skipped", "dead", "failed", "refused", "bytes")}
    summary.update(images=len(jobs), no_image_url=no_url)
    log.info("%s: %s", info.category, summary)
    return summary


def download_files(
    files: Sequence[tuple[str, bool]], base: str, out_dir: Path, dataset: str, cfg: DownloadConfig
) -> dict[str, Any]:
    """Fetch ``files`` (relative names, each with whether it is required) from the base URL
    ``base`` (http(s), or the ``file://`` URL of a local mirror) into ``out_dir``.

    The same manifest, checks and resumption as ``download_dataset``: a present, recorded file
    is kept; a required file that cannot be had raises ``DownloadError`` naming its URL; an
    optional one is recorded and skipped. Returns the counts (ok, skipped, dead, failed, bytes).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out_dir)
    manifest = _Manifest(out_dir, dataset)
    counts: Counter[str] = Counter()
    stop = threading.Event()
    try:
        for rel, required in files:
            job = _Job(_join(base, rel), rel, required=required)
            manifest.plan(job)
            entry, skipped = _obtain(job, manifest.old(job), out_dir, cfg, stop)
            manifest.record(job, entry)
            _count(counts, entry, skipped)
            if required and entry["status"] != "ok":
                raise DownloadError(
                    f"could not download {job.url}: {entry['error']}. This failure is not "
                    "remembered: running the download again requests it again"
                )
    finally:
        manifest.save()
    summary = {k: counts[k] for k in ("ok", "skipped", "dead", "failed", "bytes")}
    log.info("%s: %s", dataset, summary)
    return summary
