"""Preprocessing of raw Amazon-2014-format files into the processed contract."""

from __future__ import annotations

import gzip
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data.cnn_features import IMAGE_FEATURES_FILE, published_image_features
from pipeline.data.datasets import DatasetInfo
from pipeline.data.images import ImageStatus, load_image, placeholder_jpeg
from pipeline.data.itemtext import item_text
from pipeline.data.preprocess import PreprocessConfig, kcore_filter, preprocess, split_labels
from pipeline.data.schemas import INTERACTIONS, ITEMS, read_table

INFO = DatasetInfo("tiny", "Tiny", synthetic=True)
CORE_ITEMS = [f"I{i:02d}" for i in range(20)]


def _jpeg(color: tuple[int, int, int], size: tuple[int, int] = (8, 8), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else color[0]).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _noise_jpeg() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _review(user: str, item: str, t: int = 1_400_000_000, rating: float = 5.0) -> dict:
    return {"reviewerID": user, "asin": item, "overall": rating, "unixReviewTime": t}


def _core_reviews() -> list[dict]:
    """A world that is already 5-core: every item has >= 5 users, every user >= 5 items."""
    rows = [_review("U_20", i) for i in CORE_ITEMS]
    for k in range(16):  # 16 users x 5 items: 4 more users for every item
        rows += [_review(f"U_5_{k:02d}", CORE_ITEMS[(5 * k + j) % 20]) for j in range(5)]
    for n in (9, 10, 15, 19):
        rows += [_review(f"U_{n}", i) for i in CORE_ITEMS[:n]]
    return rows


def _cascade_reviews() -> list[dict]:
    """J1 falls once X goes, Z once J1 goes, J2..J5 once Z goes: four rounds of removals."""
    rows = [_review("J1", i) for i in ("Z", "X", "I00", "I01", "I02")]
    for j in range(2, 6):
        rows += [_review(f"J{j}", i) for i in ("Z", "I03", "I04", "I05", "I06")]
    return rows


def _write_raw(raw: Path, reviews: list, meta: list, images: dict[str, bytes]) -> None:
    """Reviews as gzip JSON lines, metadata as gzip Python literals; str entries go in as is."""
    raw.mkdir(parents=True, exist_ok=True)
    with gzip.open(raw / INFO.reviews_file, "wt") as fh:
        fh.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in reviews)
    with gzip.open(raw / INFO.meta_file, "wt") as fh:
        fh.writelines((m if isinstance(m, str) else repr(m)) + "\n" for m in meta)
    (raw / "images").mkdir(exist_ok=True)
    for asin, data in images.items():
        (raw / "images" / f"{asin}.jpg").write_bytes(data)


def _meta() -> list:
    meta = [
        {
            "asin": a,
            "title": f"Item {a}",
            "brand": "Acme",
            "categories": [["Baby", "Toys"], ["Other"]],
            "description": f"About {a}.",
        }
        for a in CORE_ITEMS[4:19]  # I19 has no metadata line at all
    ]
    meta += [
        {
            "asin": "I00",
            "title": "Tom &amp; Jerry&#39;s\nMug",
            "brand": "Acme",
            "categories": [["Home", "Kitchen"], ["Gifts"]],
            "description": "Line one\r\n\tline  two &lt;b&gt;",
        },
        {"asin": "I01", "title": "Plain"},  # no brand, description or categories
        {"asin": "I02", "title": "Odd", "brand": None, "description": None},
        {"asin": "I03", "title": "Empty path", "categories": [], "description": ""},
        "{'asin': 'I04', 'title': ",  # malformed: cut short
        "__import__('os').system('true')",  # malformed: not a literal, never evaluated
        "['not', 'a', 'dict']",  # malformed: no asin
    ]
    return meta


def _images() -> dict[str, bytes]:
    images = {a: _jpeg((10 * k, 100, 200)) for k, a in enumerate(CORE_ITEMS)}
    images["I05"] = _noise_jpeg()[: len(_noise_jpeg()) // 2]  # truncated mid-scan
    images["I06"] = b"this is not an image"
    del images["I07"]  # missing
    buf = io.BytesIO()
    Image.new("RGBA", (8, 8), (0, 255, 0, 128)).save(buf, "PNG")
    images["I08"] = buf.getvalue()  # a PNG under a .jpg name: usable, re-encoded
    images["I09"] = _jpeg((77, 0, 0), mode="L")  # greyscale JPEG: converted to RGB
    return images


def _reviews() -> list:
    return [
        *_core_reviews(),
        *_cascade_reviews(),
        _review("U_20", "I00", t=1_500_000_000, rating=1.0),  # later duplicate of U_20/I00
        _review("U_5_00", "I00", t=1_300_000_000, rating=2.0),  # earlier: replaces the 5.0
        {"reviewerID": "U_9", "asin": "I15", "overall": float("nan"), "unixReviewTime": 1},
        {"reviewerID": "U_9", "asin": "I16", "overall": 4.0},  # no time
        {"reviewerID": "U_9", "asin": "I17", "overall": "five", "unixReviewTime": 1},
        '{"reviewerID": "U_9", "asin": ',  # malformed: not JSON
        '{"asin": "I00", "overall": 5.0}',  # malformed: no reviewer
        "[1, 2, 3]",  # malformed: not an object
    ]


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("world")
    raw, out = root / "raw" / "tiny", root / "processed" / "tiny"
    _write_raw(raw, _reviews(), _meta(), _images())
    stats = preprocess(raw, INFO, out, PreprocessConfig(workers=2))
    return raw, out, stats


def _items(out: Path) -> pl.DataFrame:
    return pl.read_parquet(out / "items.parquet")


def _interactions(out: Path) -> pl.DataFrame:
    return pl.read_parquet(out / "interactions.parquet")


def test_outputs_satisfy_the_contracts_and_polars_reads_them(processed):
    _, out, stats = processed
    read_table(out / "interactions.parquet", INTERACTIONS, "interactions")
    read_table(out / "items.parquet", ITEMS, "items")
    inter = _interactions(out)
    assert inter.schema == pl.Schema(
        {
            "user_id": pl.Int32,
            "item_id": pl.Int32,
            "rating": pl.Float32,
            "timestamp": pl.Int64,
            "split": pl.String,
        }
    )
    assert json.loads((out / "stats.json").read_text()) == stats


def test_counts_and_stats(processed):
    _, out, stats = processed
    n_users = 1 + 16 + 4  # U_20, the U_5_xx, U_9/10/15/19; the J users are gone
    n_inter = 20 + 16 * 5 + 9 + 10 + 15 + 19
    assert stats["users"] == n_users and stats["items"] == 20
    assert stats["interactions"] == n_inter == _interactions(out).height
    assert stats["density"] == pytest.approx(n_inter / (n_users * 20))
    assert sum(stats[f"{s}_interactions"] for s in ("train", "valid", "test")) == n_inter
    assert stats["malformed_review_lines"] == 3
    assert stats["malformed_meta_lines"] == 3
    assert stats["dropped_invalid_rows"] == 3
    assert stats["dropped_duplicates"] == 2
    assert stats["items_without_metadata"] == 1
    assert stats["missing_images"] == 1 and stats["corrupt_images"] == 2
    assert stats["kcore_rounds"] == 4
    assert stats["core"] == 5 and stats["seed"] == 2022


def test_no_features_file_gives_an_empty_image_features_table(processed):
    _, out, stats = processed
    assert stats["image_features_file"] is False and stats["image_features_found"] == 0
    table = pq.read_table(out / IMAGE_FEATURES_FILE)
    assert table.num_rows == 0 and table.column_names == ["item_id", "image"]
    assert table.schema.metadata[b"source_exists"] == b"false"
    assert table.schema.metadata[b"items"] == b"20"
    assert published_image_features(out / IMAGE_FEATURES_FILE, range(20)) is None


def test_ids_are_contiguous_and_sorted_by_original_id(processed):
    _, out, stats = processed
    inter, items = _interactions(out), _items(out)
    assert sorted(inter["user_id"].unique().to_list()) == list(range(stats["users"]))
    assert sorted(inter["item_id"].unique().to_list()) == list(range(stats["items"]))
    assert items["item_id"].to_list() == list(range(20))
    assert items["asin"].to_list() == CORE_ITEMS
    assert inter.select("user_id", "item_id").is_duplicated().sum() == 0


def test_duplicates_keep_the_earliest_review(processed):
    _, out, _ = processed
    inter = _interactions(out)
    u5_00 = sorted(["U_20", *(f"U_5_{k:02d}" for k in range(16)), "U_9", "U_10", "U_15", "U_19"])
    uid = u5_00.index("U_5_00")
    row = inter.filter((pl.col("user_id") == uid) & (pl.col("item_id") == 0))
    assert row["rating"].to_list() == [2.0] and row["timestamp"].to_list() == [1_300_000_000]


def _split_counts(out: Path) -> dict[int, Counter]:
    inter = _interactions(out)
    counts: dict[int, Counter] = {}
    for uid, split in inter.select("user_id", "split").iter_rows():
        counts.setdefault(uid, Counter())[split] += 1
    return counts


def test_split_follows_the_protocol_per_user(processed):
    _, out, _ = processed
    users = sorted(["U_20", *(f"U_5_{k:02d}" for k in range(16)), "U_9", "U_10", "U_15", "U_19"])
    expected = {  # n -> (train, valid, test); int(0.2 n) held out, the odd one goes to test
        5: (3, 1, 1),
        9: (7, 1, 1),
        10: (8, 1, 1),
        15: (12, 1, 2),
        19: (16, 1, 2),
        20: (16, 2, 2),
    }
    counts = _split_counts(out)
    for uid, name in enumerate(users):
        n = int(name.split("_")[1])
        got = counts[uid]
        assert (got["train"], got["valid"], got["test"]) == expected[n], name


def test_split_is_deterministic_by_seed():
    rng = np.random.default_rng(1)
    users = np.repeat(np.arange(200), rng.integers(5, 30, size=200)).astype(np.int32)
    a, b = split_labels(users, 2022), split_labels(users, 2022)
    c = split_labels(users, 7)
    assert (a == b).all()
    assert (a != c).any()
    for labels in (a, c):  # the counts per user never depend on the seed
        for u in (0, 50, 199):
            n = int((users == u).sum())
            held = 2 if n < 10 else int(n * 0.2)
            assert (labels[users == u] == "train").sum() == n - held


def test_preprocess_is_deterministic(tmp_path, processed):
    raw, out, _ = processed
    preprocess(raw, INFO, tmp_path / "again", PreprocessConfig(workers=1))
    preprocess(raw, INFO, tmp_path / "other", PreprocessConfig(seed=7, workers=2))
    first, again = _interactions(out), _interactions(tmp_path / "again")
    assert first.equals(again)
    assert _items(out).equals(_items(tmp_path / "again"))
    assert not first["split"].equals(_interactions(tmp_path / "other")["split"])


def test_item_text_as_mmrec_builds_it(processed):
    _, out, _ = processed
    items = {r["asin"]: r for r in _items(out).iter_rows(named=True)}
    assert items["I00"]["title"] == "Tom & Jerry's Mug"
    assert items["I00"]["text"] == "Tom & Jerry's Mug Acme Home Kitchen Line one line two <b>"
    assert items["I01"]["text"] == "Plain"
    assert items["I02"]["text"] == "Odd"
    assert items["I03"]["text"] == "Empty path"
    assert items["I04"]["text"] == "Item I04 Acme Baby Toys About I04."  # cut line skipped
    assert items["I19"]["title"] == "" and items["I19"]["text"] == ""


def test_item_text_unit():
    assert item_text(None) == ""
    assert item_text({"asin": "a", "categories": [["A &gt; B", "C\tD"]]}) == "A > B C D"
    assert item_text({"asin": "a", "title": "T", "categories": ["Flat", "Path"]}) == "T Flat Path"


def test_images_verified_and_placeholder(processed):
    raw, out, _ = processed
    items = {r["asin"]: r for r in _items(out).iter_rows(named=True)}
    grey = placeholder_jpeg(0, 90)
    for asin in ("I05", "I06", "I07"):  # truncated, garbage, missing
        assert items[asin]["has_image"] is False
        assert items[asin]["image_path"] is None
        assert items[asin]["image_bytes"] == grey
    with Image.open(io.BytesIO(grey)) as img:
        assert img.mode == "RGB"
        r, g, b = img.getpixel((0, 0))
        assert abs(r - 128) <= 2 and abs(g - 128) <= 2 and abs(b - 128) <= 2
    ok = items["I10"]
    assert ok["has_image"] is True
    assert ok["image_path"] == str(raw / "images" / "I10.jpg")
    assert ok["image_bytes"] == (raw / "images" / "I10.jpg").read_bytes()  # kept as is
    for asin in ("I08", "I09"):  # PNG and greyscale: re-encoded as RGB JPEG
        assert items[asin]["has_image"] is True
        with Image.open(io.BytesIO(items[asin]["image_bytes"])) as img:
            assert (img.format, img.mode) == ("JPEG", "RGB")


def test_image_size_resizes_to_a_square(tmp_path):
    path = tmp_path / "wide.jpg"
    path.write_bytes(_jpeg((200, 10, 10), size=(40, 20)))
    data, status = load_image(path, image_size=16)
    assert status is ImageStatus.OK
    with Image.open(io.BytesIO(data)) as img:
        assert img.size == (16, 16)
    data, status = load_image(tmp_path / "absent.jpg", image_size=16)
    assert status is ImageStatus.MISSING and data == placeholder_jpeg(16, 90)
    with Image.open(io.BytesIO(data)) as img:
        assert img.size == (16, 16)


def test_kcore_is_iterated_to_stability():
    pairs = [(u, i) for u in ("u1", "u2", "u3") for i in ("i1", "i2", "i3")]
    pairs += [("u4", "i4"), ("u4", "i5"), ("u4", "i1")]
    pairs += [("u5", "i5"), ("u5", "i1"), ("u5", "i2")]
    pairs += [("u6", "i4"), ("u6", "i1"), ("u6", "i2")]
    pairs += [("u7", "i4"), ("u7", "i1"), ("u7", "i3")]
    df = pl.DataFrame({"user": [u for u, _ in pairs], "item": [i for _, i in pairs]})
    one_pass = df.filter((pl.len().over("user") >= 3) & (pl.len().over("item") >= 3))
    assert one_pass.height < df.height
    assert one_pass.group_by("user").len()["len"].min() < 3  # one pass is not enough
    out, rounds = kcore_filter(df, 3)
    assert rounds == 4
    assert set(out.iter_rows()) == {(u, i) for u in ("u1", "u2", "u3") for i in ("i1", "i2", "i3")}


def test_empty_after_kcore_raises_a_clear_error(tmp_path):
    raw = tmp_path / "raw"
    reviews = [_review(f"u{u}", f"i{(u + j) % 6}") for u in range(6) for j in range(3)]
    _write_raw(raw, reviews, [], {})
    with pytest.raises(ValueError, match=r"core=5.*6 users, 6 items and 18 interactions"):
        preprocess(raw, INFO, tmp_path / "out", PreprocessConfig())


def test_failure_leaves_previous_outputs_untouched(tmp_path, processed):
    raw, out, _ = processed
    target = tmp_path / "out"
    preprocess(raw, INFO, target, PreprocessConfig(workers=2))
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    bad = tmp_path / "bad"
    _write_raw(bad, [_review("u", "i")], [], {})
    with pytest.raises(ValueError, match="left no interactions"):
        preprocess(bad, INFO, target, PreprocessConfig())
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="core = 2"):
        PreprocessConfig(core=2)
    with pytest.raises(ValueError, match="jpeg_quality"):
        PreprocessConfig(jpeg_quality=0)
    with pytest.raises(ValueError, match="image_size"):
        PreprocessConfig(image_size=-1)
