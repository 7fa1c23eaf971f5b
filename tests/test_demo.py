"""The demo world: deterministic, in the Amazon 2014 raw formats, with the defects it promises."""

from __future__ import annotations

import collections
import dataclasses
import gzip
import hashlib
import json
import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.amazon import LineStats, iter_meta, iter_reviews
from pipeline.data.datasets import IMAGES_DIR, MANIFEST_FILE
from pipeline.data.demo.attributes import ATTRIBUTES, COLOUR_WORDS, PATTERN_WORDS, TYPE_WORDS
from pipeline.data.demo.corpus import CorpusConfig, pretraining_corpus
from pipeline.data.demo.shop import DemoConfig, build_world, generate_shop

SMALL = DemoConfig(
    n_items=120,
    n_users=200,
    malformed_rate=0.05,  # 6 of 120 meta lines, round(0.05 * review lines) reviews
    duplicate_rate=0.01,
    missing_image_rate=0.05,  # 6 dead links
    corrupt_image_rate=0.025,  # 3 corrupt files
)
COLOUR_RE = re.compile(
    r"\b(" + "|".join(w for ws in COLOUR_WORDS.values() for w in ws) + r")\b", re.IGNORECASE
)


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "raw"
    return out, generate_shop(SMALL, out)


def _raw_lines(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [ln.rstrip("\n") for ln in fh]


def _decodes(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            img.load()
        return True
    except OSError:
        return False


def _kcore(pairs: set[tuple[int, int]], k: int = 5) -> set[tuple[int, int]]:
    while True:
        users = collections.Counter(u for u, _ in pairs)
        items = collections.Counter(i for _, i in pairs)
        kept = {(u, i) for u, i in pairs if users[u] >= k and items[i] >= k}
        if kept == pairs:
            return pairs
        pairs = kept


def test_same_seed_gives_identical_files_and_stale_files_go(shop, tmp_path):
    out, _ = shop
    again = tmp_path / "raw"
    again.mkdir()
    (again / "stale.txt").write_text("from an earlier run")
    generate_shop(SMALL, again)
    assert _hashes(again) == _hashes(out)


def test_different_seed_gives_a_different_world(shop, tmp_path):
    out, _ = shop
    other = tmp_path / "raw"
    generate_shop(dataclasses.replace(SMALL, seed=SMALL.seed + 1), other)
    a = _raw_lines(out / "reviews_Demo_5.json.gz")
    b = _raw_lines(other / "reviews_Demo_5.json.gz")
    assert not set(a) & set(b)


def test_meta_is_python_literals_with_exactly_the_planned_malformed_lines(shop):
    out, summary = shop
    path = out / "meta_Demo.json.gz"
    stats = LineStats()
    records = list(iter_meta(path, stats))
    assert stats.read == SMALL.n_items
    assert stats.malformed == summary["malformed_meta"] == round(SMALL.malformed_rate * 120) == 6
    assert len(records) == SMALL.n_items - 6
    for line in _raw_lines(path):
        with pytest.raises(json.JSONDecodeError):
            json.loads(line)
    for rec in records:
        assert re.fullmatch(r"B00[0-9A-Z]{7}", rec["asin"])
        assert rec["imUrl"].endswith(f"/{rec['asin']}.jpg")
        assert rec["categories"][0][0] == "Demo" and len(rec["categories"][0]) >= 2
    assert any("brand" not in r for r in records) and any("description" not in r for r in records)
    descriptions = [r["description"] for r in records if "description" in r]
    assert any("&amp;" in d or "&#39;" in d or "&quot;" in d for d in descriptions)
    assert any("\n" in d for d in descriptions)


def test_reviews_are_json_lines_with_the_amazon_fields(shop):
    out, summary = shop
    stats = LineStats()
    reviews = list(iter_reviews(out / "reviews_Demo_5.json.gz", stats))
    assert stats.malformed == summary["malformed_reviews"]
    assert stats.malformed == round(SMALL.malformed_rate * summary["review_lines"]) > 0
    assert len(reviews) == summary["review_lines"] - stats.malformed
    for r in reviews:
        assert re.fullmatch(r"A[0-9A-Z]{13}", r["reviewerID"])
        assert 1.0 <= r["overall"] <= 5.0 and isinstance(r["overall"], float)
        a, b = r["helpful"]
        assert 0 <= a <= b
        day = datetime.fromtimestamp(r["unixReviewTime"], tz=timezone.utc)
        assert r["reviewTime"] == f"{day.month:02d} {day.day}, {day.year}"
        assert r["summary"] and r["reviewText"]
    pairs = collections.Counter((r["reviewerID"], r["asin"]) for r in reviews)
    assert 0 < sum(c - 1 for c in pairs.values()) <= summary["duplicate_reviews"]


def test_shop_text_names_the_type_but_never_a_colour_or_pattern(shop):
    out, _ = shop
    records = list(iter_meta(out / "meta_Demo.json.gz"))
    reviews = list(iter_reviews(out / "reviews_Demo_5.json.gz"))
    texts = [r["title"] + " " + r.get("description", "") for r in records]
    texts += [r["reviewText"] + " " + r["summary"] for r in reviews]
    pattern_words = {w for adjs, _ in PATTERN_WORDS.values() for w in adjs} - {"plain", "solid"}
    for t in texts:
        assert not COLOUR_RE.search(t), t
        assert not set(re.findall(r"[\w-]+", t.lower())) & pattern_words, t
    world = build_world(SMALL)
    types = dict(zip(world.asins, world.item_attributes["product_type"], strict=True))
    for r in records:
        synonyms = TYPE_WORDS[ATTRIBUTES["product_type"].values[types[r["asin"]]]].synonyms
        assert any(w in r["title"].lower() for w in synonyms), r["title"]


def test_images_decode_except_the_planned_dead_and_corrupt_ones(shop):
    out, summary = shop
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["dataset"] == "Demo"
    entries = {e["url"]: e for e in manifest["files"]}
    meta = {r["asin"]: r for r in iter_meta(out / "meta_Demo.json.gz")}
    dead = [e for e in manifest["files"] if e["status"] == "dead"]
    assert len(dead) == summary["missing_images"] == 6
    assert all(e["path"] is None and e["sha256"] is None and e["error"] for e in dead)
    good, bad, pixels = 0, 0, set()
    for e in manifest["files"]:
        if e["status"] != "generated":
            continue
        path = out / e["path"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == e["sha256"]
        assert path.stat().st_size == e["bytes"]
        if not e["path"].startswith(IMAGES_DIR + "/"):
            continue
        if _decodes(path):
            with Image.open(path) as img:
                assert img.mode == "RGB" and img.size == (SMALL.image_size, SMALL.image_size)
                pixels.add(hashlib.sha256(img.tobytes()).hexdigest())
            good += 1
        else:
            bad += 1
    assert bad == summary["corrupt_images"] == 3
    assert good == len(pixels) == 120 - 6 - 3  # every image unique
    images = {p.stem for p in (out / IMAGES_DIR).glob("*.jpg")}
    for asin, rec in meta.items():
        assert rec["imUrl"] in entries
        assert (asin in images) == (entries[rec["imUrl"]]["status"] == "generated")


def test_users_follow_their_tastes_and_rate_matches_higher(shop):
    out, _ = shop
    world = build_world(SMALL)
    onehot = np.zeros((SMALL.n_items, len(world.pref_columns)))
    for c, (name, value) in enumerate(world.pref_columns):
        onehot[:, c] = world.item_attributes[name] == value
    all_match = world.preferences @ onehot.T  # (users, items)
    assert world.match.mean() > 2 * all_match.mean()
    match = {
        (world.reviewer_ids[u], world.asins[i]): m
        for u, i, m in zip(world.user, world.item, world.match, strict=True)
    }
    reviews = iter_reviews(out / "reviews_Demo_5.json.gz")
    rated = [(match[r["reviewerID"], r["asin"]], r["overall"]) for r in reviews]
    high = [o for m, o in rated if m >= 1.0]
    low = [o for m, o in rated if m < 0.5]
    assert np.mean(high) > np.mean(low) + 0.5


def test_default_world_has_the_planned_size_after_5_core():
    world = build_world(DemoConfig())
    pairs = _kcore(set(zip(world.user.tolist(), world.item.tolist(), strict=True)))
    users = {u for u, _ in pairs}
    items = {i for _, i in pairs}
    assert 2400 <= len(users) <= 2600
    assert 1400 <= len(items) <= 1500
    assert 23_000 <= len(pairs) <= 28_000


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="n_items"):
        DemoConfig(n_items=0)
    with pytest.raises(ValueError, match="malformed_rate"):
        DemoConfig(malformed_rate=1.5)
    with pytest.raises(ValueError, match="category"):
        generate_shop(SMALL, Path("/nonexistent"), category="../x")


def test_corpus_is_deterministic_and_broader_than_the_shop():
    cfg = CorpusConfig(n_pairs=300)  # two chunks: rendered by two processes, then by this one
    a, b = pretraining_corpus(cfg, workers=2), pretraining_corpus(cfg, workers=1)
    assert len(a) == 300 and a.captions == b.captions
    assert all(x.tobytes() == y.tobytes() for x, y in zip(a.images, b.images, strict=True))
    for name, labels in a.attributes.items():
        assert np.array_equal(labels, b.attributes[name]), name
    assert all(im.mode == "RGB" and im.size == (64, 64) for im in a.images)
    other = pretraining_corpus(CorpusConfig(n_pairs=300, seed=cfg.seed + 1))
    assert other.captions != a.captions
    world = build_world(SMALL)
    for name, attr in ATTRIBUTES.items():
        assert world.item_attributes[name].max() < attr.n_shop
        labels = a.attributes[name]
        assert labels.shape == (300,) and labels.min() >= 0 and labels.max() < len(attr.values)
        assert (labels >= attr.n_shop).any(), f"no corpus-only {name} value"
    colours = ATTRIBUTES["colour"].values
    for text, label in zip(a.captions, a.attributes["colour"], strict=True):
        named = {m.lower() for m in COLOUR_RE.findall(text)}
        assert named & set(COLOUR_WORDS[colours[label]]), text
    assert any(w in " ".join(a.captions) for w in ("navy", "maroon", "teal"))
    assert any(attr in " ".join(a.captions) for attr in ATTRIBUTES["brand"].values)


def test_corpus_respects_image_size():
    corpus = pretraining_corpus(CorpusConfig(n_pairs=4, image_size=48))
    assert [im.size for im in corpus.images] == [(48, 48)] * 4
