"""What a real run costs at the sizes of Amazon Baby, Sports and Clothing: measured on this
machine (preprocess, one epoch of each recommender on cached features, one validation pass) and
projected for a device from FLOP counts (ViT-B/16 and VLMo base-plus extraction, fine-tuning
and end-to-end epochs); see benchmarks/README.md.

    python benchmarks/cost_table.py                          # all three sizes, every stage
    python benchmarks/cost_table.py --datasets baby          # a quick run
    python benchmarks/cost_table.py --stages flops --device-tflops 989 --utilisation 0.35
    python benchmarks/cost_table.py --out /tmp/costs.md

Measured rows run one at a time, each in a fresh process (peak memory is that process's VmHWM:
data, features, model, the epoch and the validation pass). Projected rows are FLOPs over an
assumed sustained device throughput (--device-tflops x --utilisation); they are labelled so.
Not a test: its numbers hold only for the machine, the load on it and the run that printed them.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from synthetic import IMAGE_DIM, SIZES, TEXT_DIM, Size, synthetic_arrays
from timing import chosen_models, peak_rss_mib

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("baby", "sports", "clothing")  # Amazon 2014, 5-core (REFERENCE sizes in synthetic.py)
STAGES = ("preprocess", "train", "flops")
PAPER_ENCODERS = (("clip", "ViT-B-16"), ("vlmo", "vlmo_base_plus_patch16_224"))
DEFAULT_TFLOPS = 312.0  # an A100's dense bf16 peak: the most common research GPU
DEFAULT_UTILISATION = 0.4  # share of peak a transformer training/inference loop sustains
PAPER_BATCH = 2048  # the LMM4Rec / MMRec batch (params.yaml's train.batch_size is the demo's)
TEXT_WORDS = 300  # words of item text in the FLOP count: fills CLIP's 77 and VLMo's 40 tokens
PAIR_BATCH = 2  # image-text pairs in the fine-tuning FLOP count (ITC and ITM need >= 2)
REVIEW_POOL = 2000  # distinct synthetic review texts the raw reviews draw from
WORDS = "soft small sturdy easy clean cute baby bottle seat strap fabric colour size great".split()


def _params() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


# ---------------------------------------------------------------- raw files and preprocess


def write_raw(size: Size, raw: Path, seed: int) -> dict[str, int]:
    """Raw Amazon-2014-format files of ``size`` in ``raw`` as preprocess reads them: the 5-core
    reviews (JSON lines with review text), metadata of the same items (Python-literal lines)
    and the published 4096-d image features (``.b``) of every item; no images."""
    from pipeline.data.amazon import ASIN_BYTES
    from pipeline.data.datasets import get_dataset

    info = get_dataset(size.name)
    users, items, _ = synthetic_arrays(size, seed)
    rng = np.random.default_rng([seed, 2])
    asins = [f"B{i:09d}" for i in rng.permutation(10**6)[: size.items]]
    reviewers = [f"A{u:013d}" for u in range(size.users)]
    texts = [" ".join(rng.choice(WORDS, rng.integers(20, 160))) for _ in range(REVIEW_POOL)]
    times = rng.integers(1_100_000_000, 1_406_000_000, len(users))
    raw.mkdir(parents=True, exist_ok=True)
    with gzip.open(raw / info.reviews_file, "wt", compresslevel=6) as fh:
        for k, (u, i, t) in enumerate(zip(users, items, times, strict=True)):
            review = {
                "reviewerID": reviewers[u],
                "asin": asins[i],
                "reviewerName": f"Reviewer {u}",
                "helpful": [int(k % 3), int(k % 5)],
                "reviewText": texts[k % REVIEW_POOL],
                "overall": float(1 + k % 5),
                "summary": texts[(k * 7) % REVIEW_POOL][:40],
                "unixReviewTime": int(t),
                "reviewTime": "01 1, 2014",
            }
            fh.write(json.dumps(review) + "\n")
    with gzip.open(raw / info.meta_file, "wt", compresslevel=6) as fh:
        for i, asin in enumerate(asins):
            related = [asins[j] for j in rng.integers(0, size.items, 30)]
            meta = {
                "asin": asin,
                "title": texts[i % REVIEW_POOL][:60],
                "price": float(i % 100) + 0.99,
                "imUrl": f"http://ecx.images-amazon.com/images/I/{asin}.jpg",
                "related": {"also_bought": related[:20], "also_viewed": related[20:]},
                "brand": f"Brand{i % 500}",
                "categories": [[info.category, "Sub", f"Leaf{i % 40}"]],
                "salesRank": {info.category: int(i)},
                "description": texts[(i * 3) % REVIEW_POOL],
            }
            fh.write(repr(meta) + "\n")
    record = np.dtype([("asin", f"S{ASIN_BYTES}"), ("vector", "<f4", (IMAGE_DIM,))])
    features = np.empty(size.items, dtype=record)
    features["asin"] = [a.encode() for a in asins]
    features["vector"] = rng.standard_normal((size.items, IMAGE_DIM), dtype=np.float32)
    features.tofile(raw / info.image_features_file)
    return {"reviews": len(users), "items": size.items}


def preprocess_worker(name: str, raw: Path, out: Path, seed: int) -> dict[str, Any]:
    """Time ``pipeline.data.preprocess.preprocess`` on ``raw`` (core 5, as params.yaml)."""
    from pipeline.data.datasets import get_dataset
    from pipeline.data.preprocess import PreprocessConfig, preprocess

    core = int((_params().get("preprocess") or {}).get("core", 5))
    start = time.perf_counter()
    stats = preprocess(raw, get_dataset(name), out, PreprocessConfig(core=core, seed=seed))
    return {
        "seconds": time.perf_counter() - start,
        "review_lines": stats["review_lines"],
        "kept": f"{stats['users']:,} users, {stats['items']:,} items, "
        f"{stats['interactions']:,} interactions",
    }


# ---------------------------------------------------------------- recommenders


def train_worker(name: str, model: str, seed: int, batch: int, steps: int, budget: float) -> dict:
    """One model at ``name``'s size: build, time ``steps`` steps and one validation pass
    (``bench_recommenders.probe``), then one whole epoch on a fresh model when the steps
    project it within ``budget`` seconds; else the epoch is the projection."""
    from bench_recommenders import build_model, probe
    from synthetic import synthetic_features, synthetic_interactions

    from pipeline.core.distributed import World
    from pipeline.recommenders import get_recommender
    from pipeline.training.trainer import TrainConfig, _train_epoch

    size = SIZES[name]
    data = synthetic_interactions(size, seed)
    features = (
        synthetic_features(size.items, seed) if get_recommender(model).uses_features else None
    )
    cfg = TrainConfig(batch_size=batch, device="cpu", seed=seed)
    measured = probe(model, data, features, cfg, steps)
    row = {
        "eval_s": measured["eval_s"],
        "steps": measured["steps_per_epoch"],
        "step_s": measured["step_s"],
    }
    if measured["projected_epoch_s"] > budget:
        return {**row, "epoch_s": measured["projected_epoch_s"], "projected": True}
    start = time.perf_counter()
    fresh = build_model(model, data, features, seed)
    row["build_s"] = time.perf_counter() - start
    optimizer = torch.optim.Adam(fresh.parameters(), lr=cfg.lr)
    start = time.perf_counter()
    _train_epoch(fresh, optimizer, data, cfg, 1, torch.device("cpu"), World())
    return {**row, "epoch_s": time.perf_counter() - start, "projected": False}


# ---------------------------------------------------------------- FLOP counts and projections


def encoder_flops(family: str, arch: str, freeze: int) -> dict[str, float]:
    """FLOPs per item of ``arch`` (randomly initialised, no download), counted by torch's
    FlopCounterMode on real forward passes: one 224 px image and one text filling the context
    (``extract``); the frozen prefix and the trained suffix of both towers at depth ``freeze``
    (``prefix``, ``suffix``: what e2e caches once and what each step runs); one fine-tuning
    pair's forward through the encoder's own loss (``pair``, counted on ``PAIR_BATCH`` pairs)."""
    from bench_extract import flops_per_item
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.encoders import get_encoder

    torch.manual_seed(0)
    encoder = get_encoder(family).from_arch(arch)
    side = int(encoder.image_size)
    images = torch.randn(PAIR_BATCH, 3, side, side)
    text = " ".join(WORDS[i % len(WORDS)] for i in range(TEXT_WORDS))
    tokens = encoder.tokenize([text] * PAIR_BATCH)
    one = _first(tokens)
    image_f, text_f = flops_per_item(encoder, images[:1], one)
    k = min(freeze, encoder.n_blocks())

    def counted(fn: Any, *args: Any) -> tuple[float, Any]:
        with FlopCounterMode(display=False) as counter:
            out = fn(*args)
        return float(counter.get_total_flops()), out

    with torch.inference_mode():
        image_pre, image_prefix = counted(encoder.image_prefix, images[:1], k)
        text_pre, text_prefix = counted(encoder.text_prefix, one, k)
        image_suf, _ = counted(encoder.image_suffix, image_prefix, k)
        text_suf, _ = counted(encoder.text_suffix, text_prefix, k)
    pair, _ = counted(encoder.pair_losses, images, tokens)
    return {
        "extract": image_f + text_f,
        "image": image_f,
        "text": text_f,
        "prefix": image_pre + text_pre,
        "suffix": image_suf + text_suf,
        "pair": pair / PAIR_BATCH,
        "freeze": k,
        "blocks": encoder.n_blocks(),
        "context": int(one["input_ids"].shape[1] if isinstance(one, dict) else one.shape[1]),
    }


def _first(tokens: Any) -> Any:
    """The first row of a token batch (a tensor, or a dict of tensors)."""
    if isinstance(tokens, dict):
        return {key: value[:1] for key, value in tokens.items()}
    return tokens[:1]


def flops_worker() -> dict[str, Any]:
    """``encoder_flops`` of ViT-B/16 and VLMo base-plus at the params' e2e freeze depth, with
    the params' fine-tuning holdout of each."""
    from pipeline.encoders import list_encoders
    from stages.e2e import settings as e2e_settings
    from stages.params import encoder_section

    params = _params()
    out = {}
    for family, arch in PAPER_ENCODERS:
        e2e_cfg, _, _ = e2e_settings({**params, "encoder": family}, "vbpr")
        counts = encoder_flops(family, arch, e2e_cfg.freeze_layers)
        finetune = encoder_section(params["finetune"], family, list_encoders(), "finetune")
        counts["holdout"] = float(finetune["holdout"])
        out[family] = {"arch": arch, **counts}
    return out


def e2e_items_per_epoch(size: Size, seed: int, batch: int) -> tuple[int, int]:
    """(steps, items encoded with gradients) of one e2e epoch at ``size``: the sum over the
    epoch's batches of their unique positive and negative items, as ``EndToEnd.loss`` encodes."""
    from synthetic import synthetic_interactions

    from pipeline.training.sampling import epoch_batches

    data = synthetic_interactions(size, seed)
    steps = items = 0
    for _, pos, neg in epoch_batches(data, batch, seed, 1):
        steps += 1
        items += int(torch.unique(torch.cat([pos, neg])).numel())
    return steps, items


def projections(flops: dict[str, Any], n_items: int, e2e_items: int) -> dict[str, float]:
    """FLOPs of the device stages of one encoder for a catalogue of ``n_items``: extraction
    (every item's image and text, forward), one fine-tuning epoch (the non-held-out pairs'
    forward and backward, backward = 2 x forward, plus one forward of the held-out items for
    retrieval), one e2e epoch (forward and backward of the unfrozen layers on ``e2e_items``,
    plus the bank refresh before the validation: one suffix forward of every item) and the
    e2e prefix cache (one forward of the frozen layers of every item, once per run)."""
    held = round(flops["holdout"] * n_items)
    return {
        "extract": n_items * flops["extract"],
        "finetune": 3 * (n_items - held) * flops["pair"] + held * flops["extract"],
        "e2e": 3 * e2e_items * flops["suffix"] + n_items * flops["suffix"],
        "prefix": n_items * flops["prefix"],
    }


def device_seconds(flop: float, tflops: float, utilisation: float) -> float:
    """Seconds for ``flop`` at ``utilisation`` of a ``tflops`` TFLOP/s peak."""
    return flop / (tflops * 1e12 * utilisation)


# ---------------------------------------------------------------- orchestration and output


def run_worker(args: list[str], timeout: float) -> dict[str, Any]:
    """Run this script as a worker in a fresh process; its RESULT line (with its VmHWM peak),
    or an error saying what went wrong."""
    command = [sys.executable, __file__, *args]
    try:
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {timeout:g} s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if lines:
        return json.loads(lines[-1].removeprefix("RESULT "))
    if done.returncode < 0:
        return {"error": f"killed by signal {-done.returncode} (out of memory?)"}
    return {"error": f"exited with code {done.returncode}, no result"}


def worker_main(args: argparse.Namespace) -> None:
    """A worker's one job, then its RESULT line of JSON with its peak resident memory."""
    torch.set_num_threads(args.threads)
    kind = args.worker
    if kind == "raw":
        result: dict[str, Any] = write_raw(SIZES[args.datasets], Path(args.path), args.seed)
    elif kind == "preprocess":
        raw = Path(args.path)
        result = preprocess_worker(args.datasets, raw / "raw", raw / "processed", args.seed)
    elif kind == "train":
        result = train_worker(
            args.datasets, args.model, args.seed, args.batch_size, args.steps, args.epoch_budget
        )
    else:
        result = flops_worker()
    print("RESULT " + json.dumps({**result, "peak_rss_mib": peak_rss_mib()}), flush=True)


def machine() -> str:
    """CPU model, cores, memory, Python and torch versions."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB; Python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )


def load_average() -> str:
    """The 1, 5 and 15 minute load averages."""
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def duration(seconds: float) -> str:
    """Seconds in the unit a planner reads: s, min or h."""
    if seconds < 120:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def measured_rows(args: argparse.Namespace, models: list[str]) -> list[str]:
    """Markdown rows of the measured stages, one process each, in order."""
    rows = []
    for name in args.datasets.split(","):
        if "preprocess" in args.stages:
            with tempfile.TemporaryDirectory(prefix=f"costs-{name}-") as tmp:
                common = ["--datasets", name, "--seed", str(args.seed), "--threads", "1"]
                wrote = run_worker(["--worker", "raw", "--path", f"{tmp}/raw", *common], 3600)
                res = (
                    wrote
                    if "error" in wrote
                    else run_worker(["--worker", "preprocess", "--path", tmp, *common], 3600)
                )
            rows.append(_row(name, "preprocess", res, "measured; kept " + res.get("kept", "")))
            print(f"  {name} preprocess: {_brief(res)}", file=sys.stderr, flush=True)
        if "train" not in args.stages:
            continue
        for model in models:
            command = ["--worker", "train", "--datasets", name, "--model", model]
            command += ["--seed", str(args.seed), "--threads", str(args.threads)]
            command += ["--batch-size", str(args.batch_size), "--steps", str(args.steps)]
            command += ["--epoch-budget", str(args.epoch_budget)]
            res = run_worker(command, args.timeout)
            if "error" in res:
                how = ""
            elif res["projected"]:
                how = (
                    f"epoch PROJECTED: {res['step_s']:.2f} s/step x {res['steps']} steps "
                    f"(median of {args.steps} timed steps)"
                )
            else:
                how = (
                    f"measured, {res['steps']} steps of {args.batch_size}; "
                    f"model built in {duration(res['build_s'])}"
                )
            rows.append(_row(name, model, res, how))
            print(f"  {name} {model}: {_brief(res)}", file=sys.stderr, flush=True)
    return rows


def _brief(res: dict[str, Any]) -> str:
    return res.get("error") or json.dumps({k: v for k, v in res.items() if k != "kept"})


def _row(dataset: str, stage: str, res: dict[str, Any], how: str) -> str:
    """| dataset | stage | time | validation pass | peak RSS | how |"""
    if "error" in res:
        return f"| {dataset} | {stage} | failed: {res['error']} | | | |"
    seconds = res.get("epoch_s", res.get("seconds", 0.0))
    time_s = ("~" if res.get("projected") else "") + duration(seconds)
    eval_s = duration(res["eval_s"]) if "eval_s" in res else "—"
    return f"| {dataset} | {stage} | {time_s} | {eval_s} | {res['peak_rss_mib']:,.0f} | {how} |"


def projected_rows(args: argparse.Namespace, flops: dict[str, Any]) -> list[str]:
    """Markdown rows of the device stages, per dataset and encoder."""
    rows = []
    for name in args.datasets.split(","):
        size = SIZES[name]
        steps, e2e_items = e2e_items_per_epoch(size, args.seed, args.batch_size)
        for counts in flops.values():
            total = projections(counts, size.items, e2e_items)
            cells = [
                f"{duration(device_seconds(total[key], args.device_tflops, args.utilisation))} "
                f"({total[key] / 1e15:.2f} PF)"
                for key in ("extract", "finetune", "e2e", "prefix")
            ]
            rows.append(
                f"| {name} | {counts['arch']} | {size.items:,} | {' | '.join(cells)} | "
                f"{steps} steps, {e2e_items / steps:,.0f} unique items a step |"
            )
    return rows


def render(
    args: argparse.Namespace,
    measured: list[str],
    flops: dict[str, Any] | None,
    projected: list[str],
    load: tuple[str, str],
    seconds: float,
) -> str:
    """The whole markdown report: header notes, the measured table, the projected table."""
    effective = args.device_tflops * args.utilisation
    sizes = "; ".join(
        f"{n} {SIZES[n].users:,} users / {SIZES[n].items:,} items / "
        f"{SIZES[n].interactions:,} interactions"
        for n in args.datasets.split(",")
    )
    lines = [
        f"## Cost of a real run ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"- Machine: {machine()}; {args.threads} torch thread(s) for the recommenders, 1 for "
        "preprocess.",
        f"- Load average (1 / 5 / 15 min) before: {load[0]}; after: {load[1]}. "
        f"Script wall time {duration(seconds)}.",
        f"- Sizes (Amazon 2014, 5-core, as published): {sizes}. Synthetic data of those sizes "
        f"(benchmarks/synthetic.py), seed {args.seed}.",
        f"- Assumed device throughput: {args.device_tflops:g} TFLOP/s peak x "
        f"{args.utilisation:g} utilisation = {effective:g} TFLOP/s sustained.",
    ]
    if measured:
        lines += [
            "",
            f"### Measured on this machine (CPU, {args.threads} thread(s))",
            "",
            "Preprocess: `pipeline.data.preprocess.preprocess` (core 5) on synthetic raw "
            "Amazon-2014 files: gzip JSON-lines reviews with review text, Python-literal "
            "metadata lines for the same items only (a real `meta_<Cat>` file holds the whole "
            "category, several times more lines), Amazon's 4096-d `.b` image features of "
            "every item; no images (items without an image file are only counted, so image "
            "decoding is excluded). "
            f"Recommenders: one training epoch at batch {args.batch_size} (the paper's), each "
            "model's `recommenders.<model>` settings from params.yaml, features as `cnn_st` "
            f"(random {IMAGE_DIM}-d image + {TEXT_DIM}-d text float32), and one full validation "
            "pass (every valid user scored against every item, train items masked, top-50). "
            f"An epoch projected to take over {args.epoch_budget:g} s is not run: its time is "
            f"the median of {args.steps} timed steps x the steps of an epoch, marked `~` and "
            "PROJECTED. Peak RSS: the worker process's VmHWM (data, features, model, the "
            "steps, the epoch and the validation pass; for preprocess, a process that imports "
            "torch and the pipeline, then runs it; the raw files are written by another).",
            "",
            "| dataset | stage | time (one epoch) | validation pass | peak RSS MiB | how |",
            "|---|---|---:|---:|---:|---|",
            *measured,
        ]
    if flops:
        per_item = "; ".join(
            f"{c['arch']}: extraction {c['image'] / 1e9:.1f} (image 224 px) + "
            f"{c['text'] / 1e9:.1f} (text, {c['context']} tokens) GFLOP, fine-tuning pair "
            f"forward {c['pair'] / 1e9:.1f} GFLOP, frozen prefix {c['prefix'] / 1e9:.1f} / "
            f"trained suffix {c['suffix'] / 1e9:.1f} GFLOP (lowest {c['freeze']} of "
            f"{c['blocks']} blocks frozen), fine-tuning holdout {c['holdout']:g}"
            for c in flops.values()
        )
        images_per_s = effective * 1e12 / flops["clip"]["image"]
        lines += [
            "",
            f"### PROJECTED for a device at {effective:g} TFLOP/s sustained (not measured)",
            "",
            "FLOPs per item from torch's FlopCounterMode on real forward passes of the randomly "
            "initialised encoder (matmuls, convolutions and attention; elementwise work not "
            f"counted): {per_item}. Backward = 2 x forward. Extraction: every item's image and "
            "text, forward. Fine-tuning epoch: the non-held-out pairs through the encoder's own "
            "loss (CLIP: ITC; VLMo: ITC + ITM + MLM), forward and backward, plus the held-out "
            "items' retrieval forward. E2E epoch: the unfrozen layers (e2e.freeze_layers of "
            "params.yaml) forward and backward on each step's unique items at batch "
            f"{args.batch_size}, plus one bank refresh (suffix forward of every item) before "
            "the validation; the recommender's own work and data loading are left out. Prefix "
            "cache: the frozen layers over every item, once per e2e run. A run is many epochs: "
            "multiply by the epochs early stopping takes. The e2e freeze depths are "
            "params.yaml's (set for the demo encoders); `e2e.freeze_layers` changes them.",
            "",
            f"Check of the assumption: it encodes {images_per_s:,.0f} ViT-B/16 images a "
            "second (public model-only inference figures, mixed precision: ~3,356 img/s on an "
            "RTX 4090, ~4,671 on an RTX Pro 6000; REFERENCE.md).",
            "",
            "| dataset | encoder | items | extraction | fine-tune epoch | e2e epoch | "
            "e2e prefix cache (once) | e2e batches |",
            "|---|---|---:|---:|---:|---:|---:|---|",
            *projected,
        ]
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "--datasets",
        default=",".join(DATASETS),
        help=f"comma-separated sizes (default: {','.join(DATASETS)})",
    )
    parser.add_argument(
        "--stages",
        default=",".join(STAGES),
        help="comma-separated: preprocess (measured), train (measured: one "
        "epoch + one validation pass per model), flops (device projections); "
        "default: all",
    )
    parser.add_argument("--models", help="comma-separated recommenders (default: every one)")
    parser.add_argument(
        "--device-tflops",
        type=float,
        default=DEFAULT_TFLOPS,
        help=f"the device's peak TFLOP/s (default {DEFAULT_TFLOPS:g}: an A100's dense bf16)",
    )
    parser.add_argument(
        "--utilisation",
        type=float,
        default=DEFAULT_UTILISATION,
        help=f"share of the peak sustained (default {DEFAULT_UTILISATION:g})",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=PAPER_BATCH,
        help=f"recommender and e2e batch (default {PAPER_BATCH}, the paper's)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument(
        "--steps",
        type=int,
        default=5,
        help="steps timed before deciding to run a whole epoch (default 5)",
    )
    parser.add_argument(
        "--epoch-budget",
        type=float,
        default=60.0,
        help="seconds: a longer projected epoch is reported as projected, not run (default 60)",
    )
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="seconds per recommender process (default 900)"
    )
    parser.add_argument("--seed", type=int, default=2022)
    parser.add_argument("--out", type=Path, help="also write the markdown table to this file")
    parser.add_argument(
        "--worker", choices=("raw", "preprocess", "train", "flops"), help=argparse.SUPPRESS
    )
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return args
    unknown = set(args.datasets.split(",")) - set(DATASETS) | set(args.stages.split(",")) - set(
        STAGES
    )
    if unknown:
        parser.error(f"unknown {sorted(unknown)}; datasets: {DATASETS}, stages: {STAGES}")
    if not (args.device_tflops > 0 and 0 < args.utilisation <= 1):
        parser.error("--device-tflops must be > 0 and --utilisation in (0, 1]")
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        worker_main(args)
        return
    models = chosen_models(args.models)
    start, load_before = time.perf_counter(), load_average()
    measured = measured_rows(args, models)
    flops, projected = None, []
    if "flops" in args.stages:
        flops = run_worker(["--worker", "flops", "--threads", str(args.threads)], 1800)
        if "error" in flops:
            sys.exit(f"FLOP count failed: {flops['error']}")
        flops.pop("peak_rss_mib")
        projected = projected_rows(args, flops)
    text = render(
        args, measured, flops, projected, (load_before, load_average()), time.perf_counter() - start
    )
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
