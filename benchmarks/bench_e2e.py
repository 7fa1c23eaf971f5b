"""Cost of end-to-end training against training on cached features, with and without the
frozen-prefix cache; see benchmarks/README.md.

    python benchmarks/bench_e2e.py              # demo: steps, epochs, refresh, cache size, memory
    python benchmarks/bench_e2e.py --model mmgcl --threads 2 --sizes 1500,6000
    python benchmarks/bench_e2e.py --weights models/weights/clip-finetuned --sizes ""

Not a test: it reports timings and ratios measured in this run, on this machine.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
import torch
import yaml
from PIL import Image
from timing import peak_rss_mib

from pipeline.core.distributed import World
from pipeline.data.interactions import InteractionData, load_interactions
from pipeline.data.schemas import ITEMS, read_table, validate
from pipeline.encoders import get_encoder, load_encoder
from pipeline.encoders.base import WEIGHTS_CARD, Encoder
from pipeline.encoders.clip import ClipEncoder
from pipeline.encoders.vlmo import VlmoEncoder
from pipeline.recommenders import get_recommender
from pipeline.recommenders.base import ItemFeatures, Recommender
from pipeline.training.e2e import (
    EndToEnd,
    build_end_to_end,
    build_prefix_cache,
    prefix_bytes_per_item,
)
from pipeline.training.sampling import epoch_batches
from pipeline.training.trainer import _train_epoch
from stages.e2e import settings

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data/processed/demo"
CPU = torch.device("cpu")
ACCEPT_STEP = 1.3  # an e2e step may cost this much of a cached-feature step + the unfrozen layers
PAPER_ARCHS = (("clip", "ViT-B-16"), ("vlmo", "vlmo_base_plus_patch16_224"))


def _params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def _settings(model: str):
    return settings(_params(), model)


def resolve_weights(weights: Path, scratch: Path) -> tuple[Path, str]:
    """``weights`` if it is a weights folder; otherwise randomly initialised weights of the
    params' encoder arch written to ``scratch`` (timings do not depend on the values)."""
    if (weights / WEIGHTS_CARD).is_file():
        return weights, f"{weights}"
    params = _params()
    name = params["encoder"]
    arch = params[name]["arch"]
    torch.manual_seed(0)
    get_encoder(name).from_arch(arch).save(scratch / "weights")
    return scratch / "weights", (
        f"{weights} is missing: randomly initialised {name} {arch} (timing does not depend on "
        "the values)"
    )


def _steps(model: Recommender, data, batch_size: int, n: int, seed: int) -> float:
    """Seconds per optimiser step of ``model`` over ``n`` steps as the trainer takes them
    (forward, backward, Adam and the bank), after one untimed step."""
    optimizer = torch.optim.Adam(model.param_groups(1e-4))
    model.train()
    total = 0.0
    for step, (users, pos, neg) in zip(range(n + 1), epoch_batches(data, batch_size, seed, 1),
                                       strict=False):  # fmt: skip
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model.loss(users, pos, neg).backward()
        optimizer.step()
        model.after_step()
        if step:
            total += time.perf_counter() - start
    return total / n


def _unfrozen_passes(model: EndToEnd, data, batch_size: int, n: int, seed: int) -> float:
    """Seconds per batch of the forward and backward passes of the encoder's unfrozen layers
    alone on the batch's unique items (read from the prefix cache), after one untimed batch."""
    model.train()
    total = 0.0
    for step, (_, pos, neg) in zip(range(n + 1), epoch_batches(data, batch_size, seed, 1),
                                   strict=False):  # fmt: skip
        ids = torch.unique(torch.cat([pos, neg]))
        start = time.perf_counter()
        image, text = model.encode(ids)
        (image.sum() + text.sum()).backward()
        if step:
            total += time.perf_counter() - start
        model.encoder.zero_grad(set_to_none=True)
    return total / n


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_cost(model_name: str, steps: int, weights: Path) -> dict:
    """Demo: e2e steps, epochs and bank refreshes with and without the prefix cache, and an
    e2e step against a cached-feature step + the unfrozen layers' passes on its items."""
    cfg, train_cfg, model_cfg = _settings(model_name)
    if not cfg.cached:
        raise SystemExit(f"e2e.freeze_layers = {cfg.freeze_layers}: there is no prefix to cache")
    data = load_interactions(DEMO / "interactions.parquet")
    items = read_table(DEMO / "items.parquet", ITEMS, "items")
    seed, batch = train_cfg.seed, train_cfg.batch_size
    models, build_s = {}, {}
    for cached in (True, False):
        torch.manual_seed(seed)
        encoder = load_encoder(weights)
        e2e = replace(cfg, prefix_cache=cached)
        start = time.perf_counter()
        models[cached] = build_end_to_end(model_name, data, encoder, items, model_cfg, e2e, CPU)
        build_s[cached] = time.perf_counter() - start
    model, plain = models[True], models[False]
    cache_s = _timed(lambda: build_prefix_cache(model.encoder, model.items, model.tokens,
                                                model.cfg, World()).close())  # fmt: skip

    torch.manual_seed(seed)
    bank = ItemFeatures(image=model.bank_image.clone(), text=model.bank_text.clone())
    on_features = get_recommender(model_name).build(data, bank, model_cfg)
    feature_step = _steps(on_features, data, batch, steps, seed)
    unfrozen = _unfrozen_passes(model, data, batch, steps, seed)
    cached_step = _steps(model, data, batch, steps, seed)
    plain_step = _steps(plain, data, batch, steps, seed)

    epochs = {}
    for cached, m in models.items():
        optimizer = torch.optim.Adam(m.param_groups(train_cfg.lr))
        epochs[cached] = _timed(lambda m=m, o=optimizer: _train_epoch(m, o, data, train_cfg, 1,
                                                                      CPU, World()))  # fmt: skip
    refresh = {cached: _timed(m.eval) for cached, m in models.items()}
    encoder = model.encoder
    per_epoch = math.ceil(data.n_train / batch)
    unique = np.mean([len(torch.unique(torch.cat([p, n])))
                      for _, p, n in epoch_batches(data, batch, seed, 1)])  # fmt: skip
    ratio = cached_step / (feature_step + unfrozen)
    return {
        "setting": f"{model_name}, {encoder.name} {encoder.arch}, lower {cfg.freeze_layers} of "
        f"{encoder.n_blocks()} blocks frozen, batch {batch}",
        "steps per epoch / mean unique items a step": f"{per_epoch} / {unique:.0f}",
        "cached-feature step s": f"{feature_step:.3f}",
        "unfrozen layers fwd+bwd on the step's items s": f"{unfrozen:.3f}",
        "e2e step s (prefix cache)": f"{cached_step:.3f}",
        "e2e step / (cached-feature step + unfrozen layers)": f"{ratio:.2f} (acceptance <= "
        f"{ACCEPT_STEP}: {'met' if ratio <= ACCEPT_STEP else 'NOT met'})",
        "e2e step s (no cache)": f"{plain_step:.3f} ({plain_step / cached_step:.1f}x)",
        "e2e epoch s: no cache / prefix cache": f"{epochs[False]:.1f} / {epochs[True]:.1f} "
        f"({epochs[False] / epochs[True]:.1f}x)",
        "bank refresh s: no cache / prefix cache": f"{refresh[False]:.2f} / {refresh[True]:.2f} "
        f"({refresh[False] / refresh[True]:.1f}x)",
        "build s: no cache / prefix cache (cache alone)": f"{build_s[False]:.1f} / "
        f"{build_s[True]:.1f} ({cache_s:.1f})",
        "prefix cache MiB (in memory)": f"{model.cache.nbytes / 2**20:.1f}",
    }


def meta_encoder(family: str, arch: str) -> Encoder:
    """``arch`` on the meta device: shapes without memory or weights."""
    if family == "clip":
        return ClipEncoder(open_clip.create_model(arch, pretrained=None, device="meta"), arch)
    with torch.device("meta"):
        return VlmoEncoder.from_arch(arch)


def cache_sizes() -> list[tuple[str, int, int, int]]:
    """(encoder arch, blocks, k, fp32 bytes per item) for the params' demo CLIP and the
    paper's ViT-B/16 and VLMo base-plus, at the params' freeze depth for the family."""
    params = _params()
    rows = []
    for family, arch in (("clip", params["clip"]["arch"]), *PAPER_ARCHS):
        cfg, _, _ = settings({**params, "encoder": family}, "vbpr")
        encoder = meta_encoder(family, arch)
        k = min(cfg.freeze_layers, encoder.n_blocks())
        rows.append((f"{family} {arch}", encoder.n_blocks(), k, prefix_bytes_per_item(encoder, k)))
    return rows


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


def memory_worker(model_name: str, n_items: int, steps: int, naive: bool, weights: Path) -> dict:
    """Peak RSS of ``steps`` e2e steps on a synthetic catalogue of ``n_items`` items; with
    ``naive``, of one step that encodes every item with gradients instead (no bank)."""
    cfg, train_cfg, model_cfg = _settings(model_name)
    data, items = synthetic(n_items, train_cfg.seed)
    torch.manual_seed(train_cfg.seed)
    model = build_end_to_end(model_name, data, load_encoder(weights), items, model_cfg, cfg, CPU)
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
    parser.add_argument("--steps", type=int, default=5, help="steps timed per mode (default 5)")
    parser.add_argument("--sizes", default="1500,6000", help="catalogue sizes for memory ('' none)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--weights", type=Path, default=ROOT / "models/weights/clip-pretrained",
                        help="weights folder; if missing, random weights of the arch")  # fmt: skip
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    if args.worker:
        n_items, naive = args.worker.split(":")
        row = memory_worker(args.model, int(n_items), args.steps, naive == "naive", args.weights)
        print(json.dumps(row))
        return
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as scratch:
        weights, said = resolve_weights(args.weights, Path(scratch))
        print(f"weights: {said}")
        cost = step_cost(args.model, args.steps, weights)
        print(f"\nend to end with and without the prefix cache, demo, {args.threads} threads:")
        for key, value in cost.items():
            print(f"  {key:<50} {value}")
        print("\nprefix cache bytes per item (fp32; the same at any k >= 1; bf16 halves states):")
        for arch, depth, k, size in cache_sizes():
            print(f"  {arch:<36} k={k} of {depth:<3} {size:>9,} B  "
                  f"{size * 10_000 / 2**30:6.2f} GiB per 10k items")  # fmt: skip
        sizes = [int(s) for s in args.sizes.split(",") if s]
        if sizes:
            print("\npeak RSS, one process each (bank: --steps e2e steps; naive: one step encoding")
            print("every item with gradients, what training without the bank would hold):")
            print(f"  {'items':>6} {'mode':>6} {'after build MiB':>16} {'peak MiB':>10}")
        for size in sizes:
            for mode in ("bank", "naive"):
                command = [sys.executable, __file__, "--model", args.model, "--steps",
                           str(args.steps), "--threads", str(args.threads), "--weights",
                           str(weights), "--worker", f"{size}:{mode}"]  # fmt: skip
                done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
                if done.returncode != 0:
                    print(f"  {size:>6} {mode:>6} failed: {done.stderr.strip().splitlines()[-1]}")
                    continue
                row = json.loads(done.stdout.strip().splitlines()[-1])
                built, peak = row["rss after build MiB"], row["peak rss MiB"]
                print(f"  {size:>6} {mode:>6} {built:>16.0f} {peak:>10.0f}")


if __name__ == "__main__":
    main()
