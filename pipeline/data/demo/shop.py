"""The demo shop: a deterministic synthetic store written in the Amazon 2014 raw formats.

Items carry latent attributes (see ``attributes.py``); users prefer a few attribute values and
follow a Zipf-like popularity. ``generate_shop`` writes what a download of a real category
would leave on disk: reviews (JSON lines), metadata (Python-literal lines), product images and a
manifest, with a few deliberately malformed lines, duplicate reviews, dead image links and
corrupt image files so that the real parsing and cleaning code is exercised.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.core.atomic import atomic_path
from pipeline.data.datasets import IMAGES_DIR, MANIFEST_FILE
from pipeline.data.demo import text
from pipeline.data.demo.attributes import ATTRIBUTES
from pipeline.data.demo.render import Look, render_item

log = logging.getLogger(__name__)

IMAGE_HOST = "http://images.demo.lmmrec.invalid"
DATA_HOST = "http://data.demo.lmmrec.invalid"
_ALNUM = np.array(list("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
_DAY = 86400
_FIRST_DAY = int(datetime(2009, 1, 1, tzinfo=timezone.utc).timestamp()) // _DAY
_LAST_DAY = int(datetime(2014, 7, 23, tzinfo=timezone.utc).timestamp()) // _DAY


@dataclass(frozen=True)
class DemoConfig:
    """Size and character of the demo shop. Defaults give about 1.5k items, 2.5k users and 25k
    interactions after 5-core filtering."""

    seed: int = 2022
    n_items: int = 1500
    n_users: int = 2600
    interactions_per_user: float = 10.0  # mean reviews a user writes (before any filtering)
    min_interactions: int = 4  # fewest reviews a user writes; a few users fall below 5
    image_size: int = 64  # pixels, square
    popularity_weight: float = 0.5  # weight of log-popularity (Zipf rank) in a user's choice
    preference_strength: float = 2.0  # weight of a full attribute match in a user's choice
    preferences_per_user: int = 3  # attributes (of 6) a user cares about
    taste_groups: int = 10  # hidden co-purchase groups no modality shows (only CF can learn them)
    taste_group_strength: float = 3.0  # weight of sharing the user's hidden group
    malformed_rate: float = 0.002  # fraction of review and meta lines written broken
    duplicate_rate: float = 0.002  # fraction of reviews written twice
    missing_image_rate: float = 0.01  # items whose image link is dead (no file)
    corrupt_image_rate: float = 0.005  # items whose image file holds garbage bytes

    def __post_init__(self) -> None:
        for name in ("n_items", "n_users", "image_size", "min_interactions", "taste_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)} must be >= 1")
        if self.interactions_per_user < self.min_interactions:
            raise ValueError(
                f"interactions_per_user = {self.interactions_per_user} must be >= "
                f"min_interactions = {self.min_interactions}"
            )
        if not 1 <= self.preferences_per_user <= len(ATTRIBUTES):
            raise ValueError(
                f"preferences_per_user = {self.preferences_per_user} must be in "
                f"[1, {len(ATTRIBUTES)}]"
            )
        rates = ("malformed_rate", "duplicate_rate", "missing_image_rate", "corrupt_image_rate")
        for name in rates:
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} = {getattr(self, name)} must be in [0, 1)")
        if self.missing_image_rate + self.corrupt_image_rate >= 1.0:
            raise ValueError("missing_image_rate + corrupt_image_rate must be < 1")
        for name in ("popularity_weight", "preference_strength", "taste_group_strength"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} = {getattr(self, name)} must be >= 0")


@dataclass
class ShopWorld:
    """The shop's latent truth: item attributes, user tastes and who reviewed what."""

    asins: list[str]
    item_attributes: dict[str, np.ndarray]  # name -> (n_items,) index into ATTRIBUTES[name].values
    popularity_rank: np.ndarray  # (n_items,) 1 = most popular
    reviewer_ids: list[str]
    preferences: np.ndarray  # (n_users, n_columns) weight per attribute value, see pref_columns
    pref_columns: list[tuple[str, int]]  # (attribute, value index) of each preference column
    user: np.ndarray  # (n_interactions,) user index
    item: np.ndarray  # (n_interactions,) item index
    match: np.ndarray  # (n_interactions,) preference match of the pair
    item_group: np.ndarray  # (n_items,) hidden taste group
    user_group: np.ndarray  # (n_users,) hidden taste group
    day: np.ndarray  # (n_interactions,) days since the epoch


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, *stream])


def _unique_ids(rng: np.random.Generator, n: int, prefix: str, length: int) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        for row in rng.choice(_ALNUM, size=(n - len(out), length)):
            code = prefix + "".join(row)
            if code not in seen:
                seen.add(code)
                out.append(code)
    return out


def _exact_count(rate: float, n: int) -> int:
    return int(round(rate * n))


def build_world(cfg: DemoConfig) -> ShopWorld:
    """Draw items, users and interactions (in memory) from ``cfg``."""
    rng = _rng(cfg.seed, 0)
    asins = _unique_ids(rng, cfg.n_items, "B00", 7)
    reviewer_ids = _unique_ids(rng, cfg.n_users, "A", 13)
    item_attributes = {
        name: rng.integers(0, attr.n_shop, cfg.n_items) for name, attr in ATTRIBUTES.items()
    }
    pref_columns = [(n, v) for n, a in ATTRIBUTES.items() for v in range(a.n_shop)]
    offsets = np.cumsum([0] + [a.n_shop for a in ATTRIBUTES.values()])[:-1]
    onehot = np.zeros((cfg.n_items, len(pref_columns)), np.float32)
    for off, name in zip(offsets, ATTRIBUTES, strict=True):
        onehot[np.arange(cfg.n_items), off + item_attributes[name]] = 1.0

    prefs = np.zeros((cfg.n_users, len(pref_columns)), np.float32)
    chosen = np.argsort(rng.random((cfg.n_users, len(ATTRIBUTES))), axis=1)
    chosen = chosen[:, : cfg.preferences_per_user]
    sizes = np.array([a.n_shop for a in ATTRIBUTES.values()])
    for k in range(cfg.preferences_per_user):
        attr = chosen[:, k]
        value = (rng.random(cfg.n_users) * sizes[attr]).astype(int)
        prefs[np.arange(cfg.n_users), offsets[attr] + value] = rng.uniform(0.7, 1.3, cfg.n_users)

    popularity_rank = rng.permutation(cfg.n_items) + 1
    match = prefs @ onehot.T  # (n_users, n_items)
    item_group = rng.integers(0, cfg.taste_groups, cfg.n_items)
    user_group = rng.integers(0, cfg.taste_groups, cfg.n_users)
    logits = cfg.preference_strength * match - cfg.popularity_weight * np.log(popularity_rank)
    logits = logits + cfg.taste_group_strength * (user_group[:, None] == item_group[None, :])
    logits = logits + rng.gumbel(size=logits.shape)
    mean_extra = cfg.interactions_per_user - cfg.min_interactions
    extra = rng.negative_binomial(4, 4 / (4 + mean_extra), cfg.n_users)
    counts = np.minimum(cfg.min_interactions + extra, cfg.n_items)
    order = np.argsort(-logits, axis=1)
    user = np.repeat(np.arange(cfg.n_users), counts)
    item = np.concatenate([rng.permutation(order[u, :c]) for u, c in enumerate(counts)])

    start = rng.integers(_FIRST_DAY, _LAST_DAY - 60, cfg.n_users)
    gaps = rng.exponential(25.0, len(user)).astype(int)
    first = np.cumsum(counts) - counts
    within = np.cumsum(gaps) - np.repeat(np.cumsum(gaps)[first] - gaps[first], counts)
    day = np.minimum(start[user] + within, _LAST_DAY)
    return ShopWorld(
        asins=asins,
        item_attributes=item_attributes,
        popularity_rank=popularity_rank,
        reviewer_ids=reviewer_ids,
        preferences=prefs,
        pref_columns=pref_columns,
        user=user,
        item=item,
        match=match[user, item],
        item_group=item_group,
        user_group=user_group,
        day=day,
    )


def _look(world: ShopWorld, i: int) -> Look:
    a = world.item_attributes
    return Look(
        *(ATTRIBUTES[n].values[a[n][i]] for n in ("colour", "pattern", "shape", "product_type"))
    )


def _break_line(line: str, rng: np.random.Generator, other: str) -> str:
    """Make one line unparseable the ways real dumps are: cut short, or glued to the next."""
    if rng.random() < 0.6:
        return line[: int(rng.integers(1, len(line) - 1))]
    return line + other


def _lines_with_breakage(
    lines: list[str], rate: float, rng: np.random.Generator
) -> tuple[list[str], int]:
    n_bad = _exact_count(rate, len(lines))
    bad = set(rng.choice(len(lines), n_bad, replace=False).tolist()) if n_bad else set()
    out = [
        _break_line(ln, rng, lines[(k + 1) % len(lines)]) if k in bad else ln
        for k, ln in enumerate(lines)
    ]
    return out, n_bad


def _gzip_lines(path: Path, lines: list[str]) -> None:
    data = ("\n".join(lines) + "\n").encode("utf-8")
    path.write_bytes(gzip.compress(data, compresslevel=6, mtime=0))


def _review_lines(
    cfg: DemoConfig, world: ShopWorld, names: list[str | None]
) -> tuple[list[str], int]:
    rng = _rng(cfg.seed, 2)
    n = len(world.user)
    ratings = np.clip(np.rint(3.4 + 0.7 * world.match + rng.normal(0, 1.0, n)), 1, 5)
    records = []
    for k in range(n):
        u, i = int(world.user[k]), int(world.item[k])
        rating = float(ratings[k])
        rec: dict = {"reviewerID": world.reviewer_ids[u], "asin": world.asins[i]}
        if names[u] is not None:
            rec["reviewerName"] = names[u]
        votes = 0 if rng.random() < 0.7 else int(rng.integers(1, 12))
        rec["helpful"] = [int(rng.binomial(votes, 0.7)), votes]
        body, summary = text.review(rng, rating, _look(world, i).product_type, world, i)
        when = datetime.fromtimestamp(int(world.day[k]) * _DAY, tz=timezone.utc)
        rec.update(
            reviewText=body,
            overall=rating,
            summary=summary,
            unixReviewTime=int(world.day[k]) * _DAY,
            reviewTime=f"{when.month:02d} {when.day}, {when.year}",
        )
        records.append((world.asins[i], int(world.day[k]), json.dumps(rec)))
    records.sort()
    lines = [r[2] for r in records]
    n_dup = _exact_count(cfg.duplicate_rate, len(lines))
    for k in sorted(rng.choice(len(lines), n_dup, replace=False).tolist(), reverse=True):
        lines.insert(k + 1, lines[k])
    return lines, n_dup


def _image_bytes(cfg: DemoConfig, world: ShopWorld, i: int) -> bytes:
    img = render_item(_look(world, i), cfg.image_size, _rng(cfg.seed, 3, i))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _corrupt(data: bytes, kind: int) -> bytes:
    if kind == 0:
        return data[: len(data) * 2 // 5]  # a download cut short
    return b"<html><body><h1>403 Forbidden</h1></body></html>\n"  # an error page saved as .jpg


def _file_entry(root: Path, rel: str, url: str) -> dict:
    data = (root / rel).read_bytes()
    return {
        "url": url,
        "path": rel,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "status": "generated",
        "error": None,
    }


def generate_shop(cfg: DemoConfig, out_dir: str | Path, category: str = "Demo") -> dict:
    """Write the demo shop to ``out_dir`` (replaced whole) in the Amazon 2014 raw formats.

    Returns counts of what was written, including the deliberate defects.
    """
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", category):
        raise ValueError(f"category {category!r} must be letters, digits and underscores")
    world = build_world(cfg)
    rng = _rng(cfg.seed, 1)
    names = [text.reviewer_name(rng) for _ in world.reviewer_ids]
    review_lines, n_dup = _review_lines(cfg, world, names)
    review_lines, bad_reviews = _lines_with_breakage(review_lines, cfg.malformed_rate, rng)
    meta_lines = [
        repr(text.item_meta(_rng(cfg.seed, 4, i), world, i, category, IMAGE_HOST))
        for i in range(cfg.n_items)
    ]
    meta_lines = [ln for _, ln in sorted(zip(world.asins, meta_lines, strict=True))]
    meta_lines, bad_meta = _lines_with_breakage(meta_lines, cfg.malformed_rate, rng)

    n_missing = _exact_count(cfg.missing_image_rate, cfg.n_items)
    n_corrupt = _exact_count(cfg.corrupt_image_rate, cfg.n_items)
    perm = rng.permutation(cfg.n_items)
    missing = set(perm[:n_missing].tolist())
    corrupt = {int(i): k % 2 for k, i in enumerate(perm[n_missing : n_missing + n_corrupt])}

    reviews_file = f"reviews_{category}_5.json.gz"
    meta_file = f"meta_{category}.json.gz"
    with atomic_path(out_dir) as tmp:
        (tmp / IMAGES_DIR).mkdir(parents=True)
        _gzip_lines(tmp / reviews_file, review_lines)
        _gzip_lines(tmp / meta_file, meta_lines)
        files = [
            _file_entry(tmp, reviews_file, f"{DATA_HOST}/{reviews_file}"),
            _file_entry(tmp, meta_file, f"{DATA_HOST}/{meta_file}"),
        ]
        for i in tqdm(np.argsort(world.asins), desc="demo images", disable=None):
            asin = world.asins[i]
            url = f"{IMAGE_HOST}/{asin}.jpg"
            if i in missing:
                files.append(
                    {"url": url, "path": None, "bytes": 0, "sha256": None, "status": "dead",
                     "error": "HTTP 404 Not Found"}
                )  # fmt: skip
                continue
            data = _image_bytes(cfg, world, int(i))
            if i in corrupt:
                data = _corrupt(data, corrupt[i])
            rel = f"{IMAGES_DIR}/{asin}.jpg"
            (tmp / rel).write_bytes(data)
            files.append(_file_entry(tmp, rel, url))
        manifest = {"dataset": category, "files": files}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    summary = {
        "dataset": category,
        "items": cfg.n_items,
        "users": cfg.n_users,
        "review_lines": len(review_lines),
        "duplicate_reviews": n_dup,
        "malformed_reviews": bad_reviews,
        "meta_lines": len(meta_lines),
        "malformed_meta": bad_meta,
        "images": cfg.n_items - n_missing,
        "missing_images": n_missing,
        "corrupt_images": n_corrupt,
    }
    log.info("demo shop %s written to %s: %s", category, out_dir, summary)
    return summary
