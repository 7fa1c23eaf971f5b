"""Import a Baby-sized MMRec folder, then train BPR and LightGCN ID-only on it with MMRec's
settings; prints the import time and each model's epochs, test Recall@20 and time.

    python benchmarks/bench_mmrec_baby.py --work /tmp/mmrec-baby            # import + both
    python benchmarks/bench_mmrec_baby.py --work /tmp/mmrec-baby --models bpr

The folder is synthetic (benchmarks/synthetic.py: Baby's 19,445 users, 7,050 items and
160,792 interactions, power-law item popularity, per-user 8:1:1 split as x_label; random
image_feat.npy [7050, 4096] and text_feat.npy [7050, 384]), written as MMRec ships it. It
goes through the stages as `dvc repro` runs them, with a params file whose dataset entry
reads the folder as a local mirror: download (copy and verify), preprocess (keep the split),
extract cnn_st (the .npy features), then train_id. MMRec's settings: embedding 64, Adam lr
0.001, batch 2048, up to 1000 epochs, early stop after 20 evaluations without gain on valid
Recall@20. Not a test; the figures hold for this machine and this run only.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import yaml
from synthetic import BABY, synthetic_arrays, synthetic_feature_arrays

from stages import download, extract, preprocess, train
from stages.schema import load_params

ROOT = Path(__file__).resolve().parents[1]
DATASET = "baby-mmrec"
MMREC_TRAIN = {"lr": 0.001, "batch_size": 2048, "max_epochs": 1000, "patience": 20,
               "min_epochs": 0, "eval_every": 1}  # fmt: skip

log = logging.getLogger("bench")


def dense_items(items: np.ndarray, users: np.ndarray, n_items: int) -> np.ndarray:
    """``items`` with each unused item id given one interaction of the most popular item (a
    user who lacks it), so that the ids are dense 0..n-1 as in MMRec's folders."""
    items = items.copy()
    unused = np.flatnonzero(np.bincount(items, minlength=n_items) == 0)
    top = int(np.bincount(items).argmax())
    rows = iter(np.flatnonzero(items == top))
    for item in unused:
        for row in rows:
            if not np.any((users == users[row]) & (items == item)):
                items[row] = item
                break
    return items


def write_folder(folder: Path, seed: int) -> dict[str, int]:
    """The synthetic MMRec folder: baby.inter, image_feat.npy, text_feat.npy, i_id_mapping.csv."""
    folder.mkdir(parents=True, exist_ok=True)
    users, items, split = synthetic_arrays(BABY, seed)
    items = dense_items(items, users, BABY.items)
    rng = np.random.default_rng([seed, 2])
    rating = rng.integers(1, 6, len(users))
    stamp = 1_300_000_000 + rng.integers(0, 10**8, len(users))
    rows = np.column_stack([users, items, rating, stamp, split]).astype(np.int64)
    with open(folder / "baby.inter", "w") as fh:
        fh.write("userID\titemID\trating\ttimestamp\tx_label\n")
        np.savetxt(fh, rows, fmt="%d", delimiter="\t")
    image, text = synthetic_feature_arrays(BABY.items, seed)
    np.save(folder / "image_feat.npy", image)
    np.save(folder / "text_feat.npy", text)
    mapping = "".join(f"B{i:09d}\t{i}\n" for i in range(BABY.items))
    (folder / "i_id_mapping.csv").write_text("asin\titemID\n" + mapping)
    counts = np.bincount(split, minlength=3)
    return {"users": int(users.max()) + 1, "items": int(np.unique(items).size),
            "interactions": len(users), "x_label_counts": counts.tolist()}  # fmt: skip


def write_params(work: Path, mirror: Path) -> Path:
    """params.yaml with the folder as dataset ``baby-mmrec`` and MMRec's training settings."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["dataset"] = DATASET
    params["datasets"][DATASET] = {"source": "mmrec", "category": "baby", "mirror": str(mirror)}
    params["train"].update(MMREC_TRAIN)
    for model in ("bpr", "lightgcn"):
        params["recommenders"][model]["embedding_size"] = 64
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def main() -> None:
    """Write the folder, import it through the stages, train the models; print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="empty folder for all files")
    parser.add_argument("--models", default="bpr,lightgcn", help="ID-only models, comma-separated")
    parser.add_argument("--seed", type=int, default=2022)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    work = args.work.resolve()
    mirror, raw, processed = work / "mmrec/baby", work / "raw", work / "processed"
    figures: dict = {"folder": write_folder(mirror, args.seed)}
    params = load_params(write_params(work, mirror))

    start = time.perf_counter()
    download.run(params, raw)
    stats = preprocess.run(params, raw, processed)
    extract.run(params, "cnn_st", processed / "items.parquet", work / "unused-weights",
                work / "features/cnn_st", processed / "image_features.parquet",
                processed / "prepared_features.parquet")  # fmt: skip
    figures["import_seconds"] = round(time.perf_counter() - start, 1)
    figures["imported"] = {k: stats[k] for k in ("users", "items", "interactions")}
    figures["imported"]["splits"] = [stats[f"{s}_interactions"] for s in ("train", "valid", "test")]
    log.info("import: %s", figures)

    for model in args.models.split(","):
        start = time.perf_counter()
        metrics = train.run(params, model, "id", processed / "interactions.parquet", None,
                            work / f"models/{model}", seed=args.seed)  # fmt: skip
        figures[model] = {
            "epochs": metrics["epochs"],
            "best_epoch": metrics["best_epoch"],
            "valid_recall@20": round(metrics["valid_recall@20"], 4),
            "test_recall@20": round(metrics["recall@20"], 4),
            "seconds": round(time.perf_counter() - start, 1),
        }
        log.info("%s: %s", model, figures[model])
    (work / "figures.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
