"""Cost of end-to-end training against training on cached features; see benchmarks/README.md.

    python benchmarks/bench_e2e.py                        # demo: step cost, then memory at 2 sizes
    python benchmarks/bench_e2e.py --model mmgcl --threads 2 --sizes 1500,6000

Not a test: it reports timings and ratios measured in this run, on this machine.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import yaml
from PIL import Image

from pipeline.distributed import World
from pipeline.e2e import build_end_to_end
from pipeline.encoders import load_encoder
from pipeline.features import read_feature_store
from pipeline.interactions import InteractionData, load_interactions
from pipeline.recommenders import get_recommender
from pipeline.recommenders.base import ItemFeatures
from pipeline.sampling import epoch_batches
from pipeline.schemas import ITEMS, read_table, validate
from pipeline.training import _train_epoch
from stages.e2e import settings

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data/processed/demo"
WEIGHTS = ROOT / "models/weights/clip-pretrained"
FEATURES = ROOT / "features/demo/clip-pretrained"
CPU = torch.device("cpu")


def peak_rss_mib() -> float:
    """This process's peak resident memory so far: VmHWM, which starts afresh at exec (Linux's
    ru_maxrss would carry over the parent's peak into a worker started by subprocess)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _params(model: str):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    return settings(params, model)


def _steps(model, data, batch_size: int, n: int, seed: int, after_warmup=None) -> dict[str, float]:
    """Seconds spent in ``n`` optimiser steps of ``model`` as the trainer takes them (after
    one untimed step, then ``after_warmup()``): ``forward`` (the loss, encoding included),
    ``backward``, ``update`` (Adam and the bank)."""
    optimizer = torch.optim.Adam(model.param_groups(1e-4))
    model.train()
    times = {"forward": 0.0, "backward": 0.0, "update": 0.0}
    batches = epoch_batches(data, batch_size, seed, 1)
    for step, (users, pos, neg) in zip(range(n + 1), batches, strict=False):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = model.loss(users, pos, neg)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        model.after_step()
        t3 = time.perf_counter()
        if not step and after_warmup is not None:
            after_warmup()
        if step:
            times["forward"] += t1 - t0
            times["backward"] += t2 - t1
            times["update"] += t3 - t2
    return times


def step_cost(model_name: str, steps: int) -> dict:
    """Demo: e2e steps vs the same recommender's steps on the cached pretrained features."""
    cfg, train_cfg, model_cfg = _params(model_name)
    data = load_interactions(DEMO / "interactions.parquet")
    items = read_table(DEMO / "items.parquet", ITEMS, "items")
    store = read_feature_store(FEATURES)
    features = ItemFeatures.from_arrays(store.item_ids, store.image, store.text, data.n_items)
    torch.manual_seed(train_cfg.seed)
    cached = get_recommender(model_name).build(data, features, model_cfg)
    optimizer = torch.optim.Adam(cached.param_groups(train_cfg.lr))
    start = time.perf_counter()
    _train_epoch(cached, optimizer, data, train_cfg, 1, CPU, World())
    cached_epoch = time.perf_counter() - start

    torch.manual_seed(train_cfg.seed)
    encoder = load_encoder(WEIGHTS)
    model = build_end_to_end(model_name, data, encoder, items, model_cfg, cfg, CPU)
    timers = {"decode": 0.0, "encoder forward": 0.0}
    images, encode = model.images, model.encode

    def timed_images(ids):
        t = time.perf_counter()
        out = images(ids)
        timers["decode"] += time.perf_counter() - t
        return out

    def timed_encode(ids):
        t = time.perf_counter()
        out = encode(ids)
        timers["encoder forward"] += time.perf_counter() - t
        return out

    model.images, model.encode = timed_images, timed_encode
    parts = _steps(model, data, train_cfg.batch_size, steps, train_cfg.seed,
                   lambda: timers.update(decode=0.0, **{"encoder forward": 0.0}))  # fmt: skip
    e2e_s = sum(parts.values())
    start = time.perf_counter()
    model.eval()  # the full bank refresh an evaluation starts with
    refresh_s = time.perf_counter() - start
    per_epoch = math.ceil(data.n_train / train_cfg.batch_size)
    cached_step = cached_epoch / per_epoch
    return {
        "model": model_name,
        "steps timed": steps,
        "steps per epoch": per_epoch,
        "cached epoch s": cached_epoch,
        "e2e step s": e2e_s / steps,
        "e2e epoch s (projected)": e2e_s / steps * per_epoch,
        "e2e / cached epoch": e2e_s / steps * per_epoch / cached_epoch,
        "share beyond a cached-feature step (the encoder's)": 1 - cached_step * steps / e2e_s,
        "  JPEG decoding + transforms": timers["decode"] / e2e_s,
        "  encoder forward": (timers["encoder forward"] - timers["decode"]) / e2e_s,
        "  recommender forward": (parts["forward"] - timers["encoder forward"]) / e2e_s,
        "  backward (encoder + recommender)": parts["backward"] / e2e_s,
        "  Adam + bank update": parts["update"] / e2e_s,
        "bank refresh s": refresh_s,
    }


def synthetic(n_items: int, seed: int) -> tuple[InteractionData, pa.Table]:
    """A catalogue of ``n_items`` 64 px JPEGs with short texts, and 1.7 users per item with 8
    random interactions each (6 train, 1 valid, 1 test)."""
    rng = np.random.default_rng(seed)
    n_users = int(1.7 * n_items)
    users = np.repeat(np.arange(n_users), 8)
    items = np.concatenate([rng.choice(n_items, 8, replace=False) for _ in range(n_users)])
    splits = np.tile(["train"] * 6 + ["valid", "test"], n_users)
    data = InteractionData.from_arrays(users, items, splits, n_users, n_items)
    blobs = []
    for _ in range(n_items):
        buf = io.BytesIO()
        pixels = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
        Image.fromarray(pixels).save(buf, "JPEG")
        blobs.append(buf.getvalue())
    table = pa.table(
        {
            "item_id": pa.array(np.arange(n_items), pa.int32()),
            "asin": [f"S{i:09d}" for i in range(n_items)],
            "title": [f"item {i}" for i in range(n_items)],
            "text": [
                f"a {['red', 'blue', 'green'][i % 3]} thing number {i}" for i in range(n_items)
            ],
            "image_path": pa.array([None] * n_items, pa.string()),
            "image_bytes": pa.array(blobs, pa.binary()),
            "has_image": [True] * n_items,
        }
    )
    return data, validate(table, ITEMS, "items")


def memory_worker(model_name: str, n_items: int, steps: int, naive: bool) -> dict:
    """Peak RSS of ``steps`` e2e steps on a synthetic catalogue of ``n_items`` items; with
    ``naive``, of one step that encodes every item with gradients instead (no bank)."""
    cfg, train_cfg, model_cfg = _params(model_name)
    data, items = synthetic(n_items, train_cfg.seed)
    torch.manual_seed(train_cfg.seed)
    model = build_end_to_end(model_name, data, load_encoder(WEIGHTS), items, model_cfg, cfg, CPU)
    built = peak_rss_mib()
    if naive:
        model.train()
        image, text = model.encode(torch.arange(n_items))
        model.recommender.set_item_features(ItemFeatures(image=image, text=text))
        users, pos, neg = next(iter(epoch_batches(data, train_cfg.batch_size, 0, 1)))
        model.recommender.loss(users, pos, neg).backward()
    else:
        _steps(model, data, train_cfg.batch_size, steps, train_cfg.seed)
    return {"items": n_items, "naive": naive, "rss after build MiB": built,
            "peak rss MiB": peak_rss_mib()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vbpr", help="recommender (default vbpr)")
    parser.add_argument("--steps", type=int, default=5, help="e2e steps timed (default 5)")
    parser.add_argument("--sizes", default="1500,6000", help="catalogue sizes for memory")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    if args.worker:
        n_items, naive = args.worker.split(":")
        print(json.dumps(memory_worker(args.model, int(n_items), args.steps, naive == "naive")))
        return
    cost = step_cost(args.model, args.steps)
    print(f"\nend to end vs cached features, demo, {args.model}, {args.threads} threads:")
    for key, value in cost.items():
        shown = (
            f"{value:.1%}"
            if "share" in key or key.startswith("  ")
            else f"{value:.2f}"
            if isinstance(value, float)
            else value
        )
        print(f"  {key:<50} {shown}")
    print("\npeak RSS, one process each (bank: --steps e2e steps; naive: one step encoding")
    print("every item with gradients, what training without the bank would hold):")
    print(f"  {'items':>6} {'mode':>6} {'after build MiB':>16} {'peak MiB':>10}")
    for size in (int(s) for s in args.sizes.split(",")):
        for mode in ("bank", "naive"):
            command = [sys.executable, __file__, "--model", args.model, "--steps", str(args.steps),
                       "--threads", str(args.threads), "--worker", f"{size}:{mode}"]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            if done.returncode != 0:
                print(f"  {size:>6} {mode:>6} failed: {done.stderr.strip().splitlines()[-1]}")
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            built, peak = row["rss after build MiB"], row["peak rss MiB"]
            print(f"  {size:>6} {mode:>6} {built:>16.0f} {peak:>10.0f}")


if __name__ == "__main__":
    main()
