"""Dataset sources end to end on tiny folders in each format: Amazon Reviews 2023, MMRec and
LATTICE prepared folders (read from a local mirror or an http URL), and the 2014 mirror."""

from __future__ import annotations

import functools
import gzip
import io
import json
import threading
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from pipeline.features.store import read_feature_store
from stages.cli import app
from stages.params import ParamsError
from stages.schema import validate

ROOT = Path(__file__).parents[1]
N_USERS, N_ITEMS, PER_USER = 50, 60, 8  # every user: 6 train, 1 valid, 1 test


def _user_items(user: int) -> list[int]:
    """PER_USER distinct items of ``user`` (13 is coprime with 60); all items get used."""
    return [(7 * user + 13 * k) % N_ITEMS for k in range(PER_USER)]


def _label(k: int) -> int:
    return 0 if k < PER_USER - 2 else k - (PER_USER - 3)  # 0 x6, then 1, then 2


def _features(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(N_ITEMS, 32)).astype(np.float32), rng.normal(size=(N_ITEMS, 12)).astype(
        np.float32
    )


def write_mmrec(folder: Path, name: str = "tiny") -> list[tuple[int, int, int]]:
    """An MMRec folder; returns its (user, item, x_label) rows."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [(u, i, _label(k)) for u in range(N_USERS) for k, i in enumerate(_user_items(u))]
    lines = ["userID\titemID\trating\ttimestamp\tx_label"]
    lines += [f"{u}\t{i}\t4.0\t{1_400_000_000 + n}\t{x}" for n, (u, i, x) in enumerate(rows)]
    (folder / f"{name}.inter").write_text("\n".join(lines) + "\n")
    image, text = _features(1)
    np.save(folder / "image_feat.npy", image)
    np.save(folder / "text_feat.npy", text)
    mapping = "".join(f"B{i:05d}\t{i}\n" for i in range(N_ITEMS))
    (folder / "i_id_mapping.csv").write_text("asin\titemID\n" + mapping)
    return rows


def write_lattice(folder: Path) -> dict[str, dict[str, list[int]]]:
    """A LATTICE folder; returns its splits (train/valid/test: user -> items)."""
    (folder / "5-core").mkdir(parents=True, exist_ok=True)
    splits = {s: {} for s in ("train", "valid", "test")}
    for u in range(N_USERS):
        items = _user_items(u)
        splits["train"][str(u)], splits["valid"][str(u)] = items[:-2], items[-2:-1]
        splits["test"][str(u)] = items[-1:]
    for split, name in (("train", "train"), ("valid", "val"), ("test", "test")):
        (folder / f"5-core/{name}.json").write_text(json.dumps(splits[split]))
    image, text = _features(2)
    np.save(folder / "image_feat.npy", image)
    np.save(folder / "text_feat.npy", text)
    (folder / "item2id.json").write_text(json.dumps({f"L{i:04d}": i for i in range(N_ITEMS)}))
    return splits


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (30 * i % 256, 120, 200 - 3 * i)).save(buf, "JPEG")
    return buf.getvalue()


def write_amazon2023(folder: Path, category: str, image_base: str) -> None:
    """An Amazon Reviews 2023 category in the release's layout (reviews under
    review_categories/, metadata under meta_categories/), images under images/."""
    (folder / "review_categories").mkdir(parents=True, exist_ok=True)
    (folder / "meta_categories").mkdir(exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    reviews = [
        {"rating": 5.0, "title": "ok", "text": "fine", "asin": f"V{i}-{u}",
         "parent_asin": f"P{i:03d}", "user_id": f"U{u:03d}",
         "timestamp": 1_600_000_000_000 + 1000 * (u * PER_USER + k),
         "verified_purchase": True, "helpful_vote": 0}
        for u in range(N_USERS) for k, i in enumerate(_user_items(u))
    ]  # fmt: skip
    reviews.append({"user_id": "U999", "rating": 5.0})  # no parent_asin: skipped, counted
    meta = []
    for i in range(N_ITEMS):
        (folder / f"images/P{i:03d}.jpg").write_bytes(_jpeg(i))
        meta.append({
            "main_category": "Baby", "title": f"Soft blanket {i}", "store": "Acme",
            "features": ["warm", f"size {i}"], "description": ["machine washable"],
            "categories": ["Baby Products", "Nursery"], "parent_asin": f"P{i:03d}",
            "images": [
                {"thumb": None, "large": f"{image_base}/images/X.jpg", "variant": "PT01",
                 "hi_res": None},
                {"thumb": None, "large": f"{image_base}/images/P{i:03d}.jpg", "variant": "MAIN",
                 "hi_res": None},
            ],
        })  # fmt: skip
    lines = "".join(json.dumps(r) + "\n" for r in reviews)
    (folder / f"review_categories/{category}.jsonl").write_text(lines)
    lines = "".join(json.dumps(m) + "\n" for m in meta)
    (folder / f"meta_categories/meta_{category}.jsonl").write_text(lines)


@pytest.fixture
def served(tmp_path):
    """A local http server over tmp_path/www: (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=root))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def params_file(tmp_path: Path, name: str, entry: dict) -> Path:
    """params.yaml with dataset ``name`` = ``entry``, one-epoch training and a tiny baseline
    CNN pretraining (a few seconds)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["dataset"] = name
    params["datasets"][name] = entry
    params["train"].update(max_epochs=1, min_epochs=0)
    params["download"].update(retries=0, timeout=5.0)
    params["pretrain_corpus"].update(n_pairs=64)
    params["cnn_weights"].update(epochs=1, batch_size=16, holdout_pairs=16)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def invoke(*args) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def fails(*args) -> str:
    """Run a command that must fail as a user error; its one-line message."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    return " ".join(result.output.split())


def import_prepared(tmp_path: Path, p: Path) -> Path:
    """download + preprocess + extract cnn_st of the params' dataset into tmp_path/run."""
    run = tmp_path / "run"
    proc = run / "processed"
    invoke("download", "--out", run / "raw", "--params", p)
    invoke("preprocess", "--raw", run / "raw", "--out", proc, "--params", p)
    invoke("extract", "--feature-set", "cnn_st", "--items", proc / "items.parquet",
           "--weights", run / "no-weights", "--published", proc / "image_features.parquet",
           "--prepared", proc / "prepared_features.parquet", "--out", run / "features/cnn_st",
           "--params", p)  # fmt: skip
    return run


def _triples(run: Path) -> Counter:
    frame = pl.read_parquet(run / "processed/interactions.parquet")
    return Counter(zip(frame["user_id"], frame["item_id"], frame["split"], strict=True))


LABELS = {0: "train", 1: "valid", 2: "test"}


def test_mmrec_import_keeps_split_ids_and_features(tmp_path):
    rows = write_mmrec(tmp_path / "mmrec")
    entry = {"source": "mmrec", "category": "tiny", "mirror": str(tmp_path / "mmrec")}
    run = import_prepared(tmp_path, params_file(tmp_path, "mm", entry))
    assert _triples(run) == Counter((u, i, LABELS[x]) for u, i, x in rows)
    stats = json.loads((run / "processed/stats.json").read_text())
    labels = Counter(x for _, _, x in rows)
    assert [stats[f"{s}_interactions"] for s in ("train", "valid", "test")] == [
        labels[0],
        labels[1],
        labels[2],
    ]
    store = read_feature_store(run / "features/cnn_st", N_ITEMS)
    image, text = _features(1)
    order = np.argsort(store.item_ids)
    assert np.array_equal(store.image[order], image) and np.array_equal(store.text[order], text)
    assert store.metadata["source"] == "mmrec" and store.metadata["normalized"] is False
    asins = pl.read_parquet(run / "processed/items.parquet")["asin"].to_list()
    assert asins == [f"B{i:05d}" for i in range(N_ITEMS)]


def test_lattice_import_keeps_split_and_features(tmp_path):
    splits = write_lattice(tmp_path / "lattice")
    entry = {"source": "lattice", "mirror": str(tmp_path / "lattice")}
    run = import_prepared(tmp_path, params_file(tmp_path, "lat", entry))
    expected = Counter(
        (int(u), i, s) for s, users in splits.items() for u, items in users.items() for i in items
    )
    assert _triples(run) == expected
    stats = json.loads((run / "processed/stats.json").read_text())
    for split, users in splits.items():
        assert stats[f"{split}_interactions"] == sum(len(items) for items in users.values())
    store = read_feature_store(run / "features/cnn_st", N_ITEMS)
    image, text = _features(2)
    order = np.argsort(store.item_ids)
    assert np.array_equal(store.image[order], image) and np.array_equal(store.text[order], text)
    _train_and_report(run, run / "processed", tmp_path / "params.yaml", "lattice")


def _train_and_report(run: Path, proc: Path, params: Path, model: str) -> None:
    """``model`` on the cnn_st set and BPR ID-only (one epoch each), then the report."""
    models = run / "models"
    for name, feature_set in ((model, "cnn_st"), ("bpr", "id")):
        features = ["--features", run / "features/cnn_st"] if feature_set == "cnn_st" else []
        out = models / feature_set / name / "seed-2022"
        invoke("train", "--model", name, "--feature-set", feature_set, "--interactions",
               proc / "interactions.parquet", *features, "--out", out, "--seed", 2022,
               "--params", params)  # fmt: skip
        assert json.loads((out / "metrics.json").read_text())["epochs"] == 1
    invoke("report", "--interactions", proc / "interactions.parquet", "--models", models,
           "--out", run / "report", "--params", params)  # fmt: skip
    assert model in (run / "report/significance.md").read_text()


def test_mmrec_from_url_trains_and_reports(tmp_path, served):
    """A URL source end to end: import -> cnn_st -> VBPR and BPR (one epoch) -> report."""
    www, base = served
    write_mmrec(www / "mmrec", "baby")
    entry = {"source": "mmrec", "category": "baby", "url": f"{base}/mmrec"}
    p = params_file(tmp_path, "mm", entry)
    run = import_prepared(tmp_path, p)
    manifest = json.loads((run / "raw/manifest.json").read_text())
    assert {e["url"].split("/")[-1] for e in manifest["files"] if e["status"] == "ok"} == {
        "baby.inter", "image_feat.npy", "text_feat.npy", "i_id_mapping.csv"
    }  # fmt: skip
    inter = run / "processed/interactions.parquet"
    models = run / "models"
    invoke("train", "--model", "vbpr", "--feature-set", "cnn_st", "--interactions", inter,
           "--features", run / "features/cnn_st", "--out", models / "cnn_st/vbpr/seed-2022",
           "--seed", 2022, "--params", p)  # fmt: skip
    invoke("train", "--model", "bpr", "--feature-set", "id", "--interactions", inter,
           "--out", models / "id/bpr/seed-2022", "--seed", 2022, "--params", p)  # fmt: skip
    for run_dir in ("cnn_st/vbpr/seed-2022", "id/bpr/seed-2022"):
        metrics = json.loads((models / run_dir / "metrics.json").read_text())
        assert metrics["epochs"] == 1 and 0 <= metrics["recall@20"] <= 1
    invoke("report", "--interactions", inter, "--models", models, "--out", run / "report",
           "--params", p)  # fmt: skip
    assert "vbpr" in (run / "report/significance.md").read_text()


def test_prepared_source_stops_stages_that_need_raw_items(tmp_path):
    write_mmrec(tmp_path / "mmrec")
    entry = {"source": "mmrec", "category": "tiny", "mirror": str(tmp_path / "mmrec")}
    p = params_file(tmp_path, "mm", entry)
    run = import_prepared(tmp_path, p)
    items, inter = run / "processed/items.parquet", run / "processed/interactions.parquet"
    weights = tmp_path / "no-weights"
    messages = [
        fails("extract", "--feature-set", "clip-pretrained", "--items", items, "--weights",
              weights, "--out", run / "features/clip-pretrained", "--prepared",
              run / "processed/prepared_features.parquet", "--params", p),
        fails("finetune", "--items", items, "--weights", weights, "--out", tmp_path / "ft",
              "--metrics", tmp_path / "ft.json", "--params", p),
        fails("e2e", "--model", "vbpr", "--items", items, "--interactions", inter,
              "--weights", weights, "--out", tmp_path / "e2e", "--params", p),
    ]  # fmt: skip
    for message in messages:
        assert "needs item images and texts" in message and "'mmrec'" in message, message
        assert "train_id" in message and "cnn_st" in message
    assert not (run / "features/clip-pretrained").exists() and not (tmp_path / "ft").exists()


def test_mmrec_with_metadata_gets_item_texts_and_images(tmp_path):
    """Given an Amazon 2014 metadata file for the folder's ASINs, the items get titles, texts
    and images (mirror images/; an imUrl that is not http(s) stays refused), so the LMM
    stages run as for raw data."""
    folder = tmp_path / "mmrec"
    write_mmrec(folder)
    (folder / "images").mkdir()
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(_jpeg(0))
    meta = []
    for i in range(N_ITEMS):
        url = secret.as_uri() if i == 0 else f"http://127.0.0.1:9/B{i:05d}.jpg"
        meta.append({"asin": f"B{i:05d}", "title": f"Bottle {i}", "brand": "Acme", "imUrl": url})
        if i:
            (folder / f"images/B{i:05d}.jpg").write_bytes(_jpeg(i))
    with gzip.open(folder / "meta_Baby.json.gz", "wt") as fh:
        fh.writelines(repr(m) + "\n" for m in meta)
    entry = {"source": "mmrec", "category": "tiny", "mirror": str(folder),
             "meta": "meta_Baby.json.gz"}  # fmt: skip
    p = params_file(tmp_path, "mm", entry)
    run = import_prepared(tmp_path, p)
    items = pl.read_parquet(run / "processed/items.parquet")
    assert items["text"].to_list() == [f"Bottle {i} Acme" for i in range(N_ITEMS)]
    assert items["has_image"].to_list() == [i != 0 for i in range(N_ITEMS)]
    stats = json.loads((run / "processed/stats.json").read_text())
    assert stats["missing_images"] == 1 and stats["items_without_metadata"] == 0
    message = fails("extract", "--feature-set", "clip-pretrained", "--items",
                    run / "processed/items.parquet", "--weights", tmp_path / "no-weights",
                    "--out", run / "features/clip-pretrained", "--params", p)  # fmt: skip
    assert "needs item images and texts" not in message and "no-weights" in message


def test_amazon2023_from_url_end_to_end(tmp_path, served):
    """2023 files from an http base URL: items keyed by parent_asin, text from title, store,
    categories, features and description, the MAIN image fetched; then the baseline's
    features are extracted from the items (as for raw data), VBPR and BPR train and the
    report compares them."""
    www, base = served
    write_amazon2023(www / "raw", "Baby_Products", base + "/raw")
    entry = {"source": "amazon2023", "category": "Baby_Products", "url": f"{base}/raw"}
    p = params_file(tmp_path, "baby23", entry)
    run = tmp_path / "run"
    invoke("download", "--out", run / "raw", "--params", p)
    assert len(list((run / "raw/images").glob("*.jpg"))) == N_ITEMS
    invoke("preprocess", "--raw", run / "raw", "--out", run / "processed", "--params", p)
    stats = json.loads((run / "processed/stats.json").read_text())
    assert (stats["users"], stats["items"], stats["interactions"]) == (
        N_USERS, N_ITEMS, N_USERS * PER_USER
    )  # fmt: skip
    assert stats["malformed_review_lines"] == 1 and stats["missing_images"] == 0
    items = pl.read_parquet(run / "processed/items.parquet")
    first = items.filter(pl.col("asin") == "P000").row(0, named=True)
    assert first["has_image"] and first["text"] == (
        "Soft blanket 0 Acme Baby Products Nursery warm size 0 machine washable"
    )
    inter = pl.read_parquet(run / "processed/interactions.parquet")
    assert inter["timestamp"].min() == 1_600_000_000  # milliseconds became seconds
    proc, weights = run / "processed", run / "weights/cnn_st"
    invoke("weights", "--encoder", "cnn_st", "--out", weights, "--params", p)
    invoke("extract", "--feature-set", "cnn_st", "--items", proc / "items.parquet",
           "--weights", weights, "--published", proc / "image_features.parquet",
           "--prepared", proc / "prepared_features.parquet", "--out", run / "features/cnn_st",
           "--params", p)  # fmt: skip
    assert read_feature_store(run / "features/cnn_st", N_ITEMS).metadata["n_with_image"] == N_ITEMS
    _train_and_report(run, proc, p, "vbpr")


def test_amazon2014_mirror_reads_the_folder_and_refuses_local_urls_from_data(tmp_path):
    """With a mirror, the category's files and its images come from the folder; an imUrl
    that is not http(s) stays refused, and nothing else is requested."""
    mirror = tmp_path / "mirror"
    (mirror / "images").mkdir(parents=True)
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(_jpeg(1))
    reviews, meta = [], []
    for i in range(6):
        reviews += [{"reviewerID": f"R{u}", "asin": f"A{i}", "overall": 5.0,
                     "unixReviewTime": 1_400_000_000} for u in range(5)]  # fmt: skip
        url = secret.as_uri() if i == 5 else f"http://127.0.0.1:9/A{i}.jpg"
        meta.append({"asin": f"A{i}", "title": f"Item {i}", "imUrl": url})
        if i < 5:
            (mirror / f"images/A{i}.jpg").write_bytes(_jpeg(i))
    with gzip.open(mirror / "reviews_Tiny_5.json.gz", "wt") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in reviews)
    with gzip.open(mirror / "meta_Tiny.json.gz", "wt") as fh:
        fh.writelines(repr(m) + "\n" for m in meta)
    entry = {"source": "amazon2014", "category": "Tiny", "mirror": str(mirror)}
    p = params_file(tmp_path, "tiny", entry)
    out = tmp_path / "raw"
    invoke("download", "--out", out, "--params", p)
    assert sorted(f.name for f in (out / "images").iterdir()) == [f"A{i}.jpg" for i in range(5)]
    entries = {e["url"]: e for e in json.loads((out / "manifest.json").read_text())["files"]}
    assert entries[secret.as_uri()]["status"] == "refused"
    assert entries[(mirror / "reviews_Tiny_5.json.gz").as_uri()]["status"] == "ok"
    assert not any(u.startswith("http") for u in entries)  # the network was never asked


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        ("label", "x_label has values [3]; allowed: 0 (train), 1 (valid), 2 (test)"),
        ("rows", "image_feat.npy has 59 rows, but the interactions' item ids run 0..59"),
        ("column", "no column(s) ['x_label']"),
    ],
)
def test_bad_mmrec_folder_names_the_file_and_what_is_allowed(tmp_path, breakage, expected):
    folder = tmp_path / "mmrec"
    write_mmrec(folder)
    inter = folder / "tiny.inter"
    if breakage == "label":
        inter.write_text(inter.read_text().replace("\t2\n", "\t3\n", 1))
    elif breakage == "rows":
        np.save(folder / "image_feat.npy", np.load(folder / "image_feat.npy")[:-1])
    else:
        inter.write_text(inter.read_text().replace("\tx_label", "\tlabel"))
    entry = {"source": "mmrec", "category": "tiny", "mirror": str(folder)}
    p = params_file(tmp_path, "mm", entry)
    invoke("download", "--out", tmp_path / "raw", "--params", p)
    message = fails("preprocess", "--raw", tmp_path / "raw", "--out", tmp_path / "out",
                    "--params", p)  # fmt: skip
    assert expected in message and str(tmp_path / "raw") in message, message
    assert not (tmp_path / "out").exists()


def test_missing_prepared_file_names_it(tmp_path):
    folder = tmp_path / "lattice"
    write_lattice(folder)
    (folder / "text_feat.npy").unlink()
    p = params_file(tmp_path, "lat", {"source": "lattice", "mirror": str(folder)})
    message = fails("download", "--out", tmp_path / "raw", "--params", p)
    assert f"could not download {(folder / 'text_feat.npy').as_uri()}: no such file" in message
    assert not (tmp_path / "raw/text_feat.npy").exists()


@pytest.mark.parametrize(
    ("dataset", "entry", "expected"),
    [
        ("x", {"source": "mmrc", "mirror": "/d"}, "datasets.x.source = 'mmrc' is not allowed "
         "(did you mean 'mmrec'?)"),
        ("x", {"source": "lattice"}, "datasets.x: lattice has no default location"),
        ("x", {"source": "mmrec", "category": "baby", "url": "/data/baby"},
         "datasets.x.url = '/data/baby': use an http(s) URL; a local folder goes in "
         "datasets.x.mirror"),
        ("x", {"source": "mmrec", "mirror": "/d"}, "datasets.x.category is empty"),
        ("x", {"source": "amazon2023", "category": "Baby_Products", "miror": "/d"},
         "unknown key(s) datasets.x.miror (did you mean 'mirror'?)"),
        ("y", {"source": "lattice", "mirror": "/d"}, "dataset = 'y' is not allowed"),
        ("x", {"source": "amazon2023", "category": "C", "meta": "m.json.gz"},
         "datasets.x.meta: only prepared sources (mmrec, lattice) take a metadata file"),
    ],
)  # fmt: skip
def test_params_check_dataset_entries(dataset, entry, expected):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["dataset"] = dataset
    params["datasets"]["x"] = entry
    with pytest.raises(ParamsError) as err:
        validate(params, "p.yaml")
    assert expected in str(err.value)
