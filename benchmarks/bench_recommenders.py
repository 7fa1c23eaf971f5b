"""Speed (and, with --scale, memory) of every registered recommender; see benchmarks/README.md.

    python benchmarks/bench_recommenders.py                 # the demo data, all models
    python benchmarks/bench_recommenders.py --scale         # synthetic Elec size, one process each
    python benchmarks/bench_recommenders.py --models bpr,vbpr --threads 2

Not a test: it reports timings and ratios measured in this run, on this machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from synthetic import ELEC, IMAGE_DIM, TEXT_DIM, synthetic_features, synthetic_interactions
from timing import chosen_models, median_seconds, peak_rss_mib

from pipeline.core.distributed import World
from pipeline.core.seeding import seed_everything
from pipeline.data.interactions import InteractionData, load_interactions
from pipeline.recommenders import get_recommender
from pipeline.recommenders.base import ItemFeatures, Recommender
from pipeline.training.evaluation import evaluate
from pipeline.training.sampling import epoch_batches
from pipeline.training.trainer import TrainConfig, _train_epoch
from stages.params import model_settings

ROOT = Path(__file__).resolve().parents[1]
DEMO_INTERACTIONS = ROOT / "data/processed/demo/interactions.parquet"
DEMO_FEATURES = ROOT / "features/demo/clip-pretrained"

SAMPLING_TARGET = 0.10  # negative sampling + batching: at most this share of an epoch
EVAL_TARGET = 2.0  # a full validation pass: at most this many dense score matmuls

log = logging.getLogger("bench")


def model_params(name: str) -> dict[str, Any]:
    """The model's hyperparameters in params.yaml (what the pipeline trains), or {} for
    defaults."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text()) or {}
    return model_settings(params.get("recommenders"), name)[0]


def load_demo() -> tuple[InteractionData, ItemFeatures]:
    """The demo interactions and CLIP features, or exit saying how to make them."""
    missing = [p for p in (DEMO_INTERACTIONS, DEMO_FEATURES / "items.parquet") if not p.exists()]
    if missing:
        sys.exit(f"missing {', '.join(map(str, missing))}: run `make repro` first")
    from pipeline.features.store import read_feature_store

    data = load_interactions(DEMO_INTERACTIONS)
    store = read_feature_store(DEMO_FEATURES)
    features = ItemFeatures.from_arrays(store.item_ids, store.image, store.text, data.n_items)
    return data, features


def dense_scores_seconds(n_users: int, n_items: int, dim: int, chunk: int, reps: int) -> float:
    """Time of the dense [n_users, n_items] score matmul at width ``dim`` (in ``chunk``-row
    slices, as an evaluation scores users, so that it fits in memory at any size)."""
    users = torch.randn(n_users, dim)
    items_t = torch.randn(n_items, dim).T.contiguous()

    def product() -> None:
        for start in range(0, n_users, chunk):
            users[start : start + chunk] @ items_t

    return median_seconds(product, reps)


def build_model(
    name: str, data: InteractionData, features: ItemFeatures | None, seed: int
) -> Recommender:
    """``name`` with its params.yaml section, seeded; ID-only models get no features."""
    seed_everything(seed)
    model_cls = get_recommender(name)
    return model_cls.build(data, features if model_cls.uses_features else None, model_params(name))


def bench_model(
    name: str,
    data: InteractionData,
    features: ItemFeatures | None,
    cfg: TrainConfig,
    epochs: int,
    reps: int,
) -> dict[str, Any]:
    """Build ``name``, time its training epochs, the sampling inside them, a full validation
    pass and the dense score matmul it is compared with."""
    start = time.perf_counter()
    model = build_model(name, data, features, cfg.seed)
    build_s = time.perf_counter() - start
    device = torch.device("cpu")
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    epoch_s = median_seconds(
        lambda: _train_epoch(model, optimizer, data, cfg, 1, device, World()), epochs
    )
    sampling_s = median_seconds(
        lambda: sum(1 for _ in epoch_batches(data, cfg.batch_size, cfg.seed, 1)), epochs
    )

    def validation_pass() -> None:
        model.train()  # as in training: a graph model's cached propagation is stale again
        model.eval()
        evaluate(model.score, data, "valid", cfg.topk, cfg.eval_batch_size)

    eval_s = median_seconds(validation_pass, reps)
    dim = int(getattr(model.config, "embedding_size", 64))
    dense_s = dense_scores_seconds(data.n_users, data.n_items, dim, cfg.eval_batch_size, reps)
    return {
        "model": name,
        "params": sum(p.numel() for p in model.parameters()),
        "build_s": build_s,
        "epoch_s": epoch_s,
        "sampling_s": sampling_s,
        "sampling_share": sampling_s / epoch_s,
        "eval_s": eval_s,
        "dim": dim,
        "dense_s": dense_s,
        "eval_ratio": eval_s / dense_s,
    }


def flag(ok: bool) -> str:
    return "ok" if ok else "OVER"


def print_table(rows: list[dict[str, Any]], scale: bool) -> None:
    """One line per model; failures say why."""
    header = (
        f"{'model':<10}{'params':>11}{'build s':>9}{'epoch s':>9}{'sampling':>14}"
        f"{'eval s':>9}{'dim':>5}{'dense s':>9}{'eval/dense':>15}"
    )
    if scale:
        header += f"{'RSS load MiB':>14}{'peak RSS MiB':>14}"
    print(header)
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<10}  {'' if 'probe' in r else 'FAILED: '}{r['error']}")
            continue
        share = f"{r['sampling_share']:.1%} {flag(r['sampling_share'] <= SAMPLING_TARGET)}"
        ratio = f"{r['eval_ratio']:.1f}x {flag(r['eval_ratio'] <= EVAL_TARGET)}"
        line = (
            f"{r['model']:<10}{r['params']:>11,}{r['build_s']:>9.2f}{r['epoch_s']:>9.2f}"
            f"{share:>14}{r['eval_s']:>9.2f}{r['dim']:>5}{r['dense_s']:>9.3f}{ratio:>15}"
        )
        if scale:
            line += f"{r['rss_load_mib']:>14,.0f}{r['peak_rss_mib']:>14,.0f}"
        print(line)
    print(
        f"targets: sampling <= {SAMPLING_TARGET:.0%} of an epoch; "
        f"a validation pass <= {EVAL_TARGET:g} x the dense [users x items] score matmul"
    )


def train_config(args: argparse.Namespace, batch_size: int) -> TrainConfig:
    return TrainConfig(batch_size=batch_size, device="cpu", seed=args.seed)


def run_demo(args: argparse.Namespace, names: list[str]) -> None:
    data, features = load_demo()
    batch_size = args.batch_size or 512  # params.yaml's demo batch
    cfg = train_config(args, batch_size)
    print(
        f"demo: {data.n_users} users, {data.n_items} items, {data.n_train} train pairs; "
        f"batch {batch_size}, {torch.get_num_threads()} thread(s), median of "
        f"{args.epochs} epochs / {args.reps} validation passes"
    )
    rows = []
    for name in names:
        try:
            rows.append(bench_model(name, data, features, cfg, args.epochs, args.reps))
        except Exception as exc:  # one broken model must not hide the others
            log.debug("%s failed", name, exc_info=True)
            rows.append({"model": name, "error": f"{type(exc).__name__}: {exc}"})
    print_table(rows, scale=False)


def probe(
    name: str, data: InteractionData, features: ItemFeatures | None, cfg: TrainConfig, steps: int
) -> dict[str, Any]:
    """Seconds per training step over the first ``steps`` batches of epoch 1 (after one
    untimed step), the epoch that rate projects, and one full validation pass: what a scale
    run too slow for its time budget still measures."""
    model = build_model(name, data, features, cfg.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    model.train()
    batches = epoch_batches(data, cfg.batch_size, cfg.seed, 1)
    n_batches = -(-data.n_train // cfg.batch_size)
    times = []
    for i, (users, pos, neg) in zip(range(steps + 1), batches, strict=False):
        start = time.perf_counter()
        loss = model.loss(users, pos, neg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i:  # the first step pays for lazy allocations
            times.append(time.perf_counter() - start)
    step_s = float(np.median(times))
    model.eval()
    start = time.perf_counter()
    evaluate(model.score, data, "valid", cfg.topk, cfg.eval_batch_size)
    return {
        "step_s": step_s,
        "steps_per_epoch": n_batches,
        "projected_epoch_s": step_s * n_batches,
        "eval_s": time.perf_counter() - start,
    }


def scale_worker(args: argparse.Namespace, name: str) -> None:
    """One model at Elec size, in its own process: a PROBE line of JSON (step time, projected
    epoch, a validation pass, peak memory so far), then a RESULT line after the full epoch,
    or at once when the projected epoch would not fit in what is left of ``--timeout``."""
    result: dict[str, Any] = {"model": name}
    try:
        start = time.perf_counter()
        data = synthetic_interactions(ELEC, args.seed)
        uses_features = get_recommender(name).uses_features
        features = synthetic_features(ELEC.items, args.seed) if uses_features else None
        result.update(data_s=time.perf_counter() - start, rss_load_mib=peak_rss_mib())
        cfg = train_config(args, args.batch_size or 2048)  # the paper's batch
        measured = probe(name, data, features, cfg, args.probe_steps)
        print("PROBE " + json.dumps({**measured, "peak_rss_mib": peak_rss_mib()}), flush=True)
        left = args.timeout - (time.perf_counter() - start)
        if measured["projected_epoch_s"] + measured["eval_s"] > left:
            result.update(probe=measured, error=_projection(measured, left))
        else:
            result.update(bench_model(name, data, features, cfg, epochs=1, reps=1))
    except Exception as exc:  # MemoryError included: report it with the peak reached
        result["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    result["peak_rss_mib"] = peak_rss_mib()
    print("RESULT " + json.dumps(result), flush=True)


def _measured(p: dict[str, Any]) -> str:
    """A PROBE measurement in words."""
    return (
        f"{p['step_s']:.2f} s/step x {p['steps_per_epoch']} steps = projected epoch "
        f"{p['projected_epoch_s']:,.0f} s; one validation pass {p['eval_s']:,.1f} s"
    )


def _projection(p: dict[str, Any], left: float) -> str:
    return f"epoch not run ({max(left, 0):,.0f} s left of --timeout): {_measured(p)}"


def _timeout_error(stdout: str | bytes | None, timeout: float) -> str:
    """Why a scale run gave no result, with what its PROBE line measured before the timeout."""
    text = stdout.decode() if isinstance(stdout, bytes) else stdout or ""
    probes = [ln for ln in text.splitlines() if ln.startswith("PROBE ")]
    error = f"no result within --timeout {timeout:g} s"
    if probes:
        p = json.loads(probes[-1].removeprefix("PROBE "))
        error += f"; {_measured(p)}; peak RSS {p['peak_rss_mib']:,.0f} MiB after the probe"
    return error


def run_scale(args: argparse.Namespace, names: list[str]) -> None:
    batch_size = args.batch_size or 2048
    print(
        f"scale: synthetic Elec, {ELEC.users:,} users, {ELEC.items:,} items, "
        f"{ELEC.interactions:,} interactions, features {IMAGE_DIM} + {TEXT_DIM} float32; "
        f"batch {batch_size}, {args.threads} thread(s), one epoch + one validation pass, "
        "one process per model",
        flush=True,
    )
    rows = []
    for name in names:
        command = [sys.executable, __file__, "--scale-worker", name, "--seed", str(args.seed)]
        command += ["--threads", str(args.threads), "--batch-size", str(batch_size)]
        command += ["--probe-steps", str(args.probe_steps), "--timeout", str(args.timeout)]
        start = time.perf_counter()
        try:
            done = subprocess.run(command, stdout=subprocess.PIPE, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired as exc:
            rows.append({"model": name, "error": _timeout_error(exc.stdout, args.timeout)})
            print(f"  {name}: {rows[-1]['error']}", flush=True)
            continue
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
        if lines:
            row = json.loads(lines[-1].removeprefix("RESULT "))
        elif done.returncode < 0:
            row = {"model": name, "error": f"killed by signal {-done.returncode} (out of memory?)"}
        else:
            row = {"model": name, "error": f"exited with code {done.returncode}, no result"}
        if "error" in row and "peak_rss_mib" in row:
            row["error"] += f" (peak RSS {row['peak_rss_mib']:,.0f} MiB)"
        rows.append(row)
        print(f"  {name}: {time.perf_counter() - start:.0f} s in all", flush=True)
    print_table(rows, scale=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", action="store_true", help="synthetic Elec-sized data")
    parser.add_argument("--models", help="comma-separated subset (default: every registered)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--epochs", type=int, default=3, help="demo: epochs timed (median)")
    parser.add_argument("--reps", type=int, default=3, help="demo: validation passes timed")
    parser.add_argument("--batch-size", type=int, help="default: 512 demo, 2048 scale")
    parser.add_argument("--seed", type=int, default=2022)
    parser.add_argument("--timeout", type=float, default=3600, help="scale: seconds per model")
    parser.add_argument(
        "--probe-steps", type=int, default=5, help="scale: steps timed before the full epoch"
    )
    parser.add_argument("--scale-worker", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="store_true", help="log the models' details")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    torch.set_num_threads(args.threads)
    if args.scale_worker:
        scale_worker(args, args.scale_worker)
        return
    names = chosen_models(args.models)
    (run_scale if args.scale else run_demo)(args, names)


if __name__ == "__main__":
    main()
