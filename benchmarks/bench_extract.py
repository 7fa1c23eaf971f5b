"""Speed, FLOP efficiency and peak memory of feature extraction; see benchmarks/README.md.

    python benchmarks/bench_extract.py                          # demo items, demo CLIP weights
    python benchmarks/bench_extract.py --items 256 --threads 2
    python benchmarks/bench_extract.py --rss-items 20000 \
        --encoder-weights models/weights/clip-pretrained

Times ``pipeline.features.extract.extract_features`` against a naive loop (one item at a time:
decode, transform, tokenize, forward; no batching, no workers) with the same model on the same
items, counts the FLOPs of the forward passes, times a large float32 matmul for the machine's peak,
and runs the real ``lmmrec extract`` in a child process for its peak RSS. Not a test: every
number and ratio holds for this machine and this run only.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from timing import median_seconds
from torch.utils.flop_counter import FlopCounterMode

from pipeline.encoders import Encoder, load_encoder, read_card
from pipeline.encoders.base import select_tokens
from pipeline.encoders.clip import ClipEncoder
from pipeline.features.extract import ExtractConfig, extract_features
from pipeline.features.names import feature_set_of

ROOT = Path(__file__).resolve().parents[1]
DEMO_ITEMS = ROOT / "data/processed/demo/items.parquet"
DEMO_WEIGHTS = ROOT / "models/weights/clip-pretrained"
SPEEDUP_TARGET = 5.0  # ours >= 5x the naive loop
RSS_TARGET_MIB = 4096  # the extract stage's peak memory must stay below 4 GiB
GENERATED_ITEMS = 1000  # items timed when no processed demo data exists
PEAK_SIDE = 2048  # the peak matmul: [2048, 2048] @ [2048, 2048] float32

# Runs the same typer app as the `lmmrec` console script, then reports its peak RSS (KiB):
# its own, and that of its largest finished child (a DataLoader worker, or a helper forked
# by a library: a fork's RSS counts the pages it shares with its parent).
RSS_CHILD = """
import json, resource, sys
from stages.cli import app
try:
    app(sys.argv[1:], prog_name="lmmrec")
except SystemExit as exc:
    if exc.code:
        raise
print("RSS " + json.dumps({
    "main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    "child": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
}))
"""


def demo_items(n: int | None, workdir: Path) -> tuple[pa.Table, str]:
    """The first ``n`` (None: all) processed demo items; without them, those of a small demo
    shop generated in ``workdir`` (``GENERATED_ITEMS`` items when ``n`` is None)."""
    if DEMO_ITEMS.is_file():
        table, where = pq.read_table(DEMO_ITEMS), str(DEMO_ITEMS.relative_to(ROOT))
    else:
        from pipeline.data.datasets import get_dataset
        from pipeline.data.demo import DemoConfig, generate_shop
        from pipeline.data.preprocess import PreprocessConfig, preprocess

        n = n or GENERATED_ITEMS
        n_items = max(300, int(n * 1.2))  # 5-core filtering drops a few items
        cfg = DemoConfig(n_items=n_items, n_users=int(n_items * 1.75))
        print(f"no {DEMO_ITEMS}: generating a demo shop of {n_items} items in {workdir}")
        generate_shop(cfg, workdir / "raw")
        preprocess(workdir / "raw", get_dataset("demo"), workdir / "processed", PreprocessConfig())
        table, where = pq.read_table(workdir / "processed/items.parquet"), "a generated demo shop"
    if n is not None and table.num_rows < n:
        print(f"only {table.num_rows} items available; using all of them")
    return table.slice(0, n or table.num_rows), where


def demo_encoder(weights: Path | None, workdir: Path) -> tuple[Encoder, Path, str]:
    """The encoder, a weights folder holding it (for the child process) and where it came from."""
    if weights is None and DEMO_WEIGHTS.is_dir():
        weights = DEMO_WEIGHTS
    if weights is not None:
        return load_encoder(weights), weights, str(weights)
    torch.manual_seed(0)
    encoder = ClipEncoder.tiny()
    encoder.save(workdir / "weights")
    return encoder, workdir / "weights", "ClipEncoder.tiny() (random init; no demo weights)"


def naive_extract(encoder: Encoder, items: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """One item at a time, in the main process: decode, transform, tokenize, forward."""
    encoder.eval()
    image, text = [], []
    blobs, texts = items.column("image_bytes").to_pylist(), items.column("text").to_pylist()
    with torch.inference_mode():
        for blob, words in zip(blobs, texts, strict=True):
            with Image.open(io.BytesIO(blob)) as img:
                x = encoder.image_transform(img.convert("RGB"))[None]
            image.append(F.normalize(encoder.encode_images(x), dim=-1))
            text.append(F.normalize(encoder.encode_texts(encoder.tokenize([words])), dim=-1))
    return torch.cat(image).numpy(), torch.cat(text).numpy()


def pixels(encoder: Encoder, items: pa.Table) -> torch.Tensor:
    """The items' decoded and transformed images [N, 3, H, W], as extract_features makes them."""
    out = []
    for blob in items.column("image_bytes").to_pylist():
        with Image.open(io.BytesIO(blob)) as img:
            out.append(encoder.image_transform(img.convert("RGB")))
    return torch.stack(out)


def flops_per_item(encoder: Encoder, images: torch.Tensor, tokens) -> tuple[float, float]:
    """FLOPs of one image and of one text forward pass, counted on one batch."""
    counts = []
    with torch.inference_mode():
        for encode, batch in ((encoder.encode_images, images), (encoder.encode_texts, tokens)):
            with FlopCounterMode(display=False) as counter:
                encode(batch)
            counts.append(counter.get_total_flops() / len(images))
    return counts[0], counts[1]


def matmul_peak_gflops(reps: int = 5) -> float:
    """float32 GFLOP/s of a large torch.matmul with the current thread count (best of reps)."""
    a, b = torch.randn(PEAK_SIDE, PEAK_SIDE), torch.randn(PEAK_SIDE, PEAK_SIDE)
    torch.matmul(a, b)
    best = min(median_seconds(lambda: torch.matmul(a, b), 1) for _ in range(reps))
    return 2 * PEAK_SIDE**3 / best / 1e9


def breakdown(encoder: Encoder, items: pa.Table, batch_size: int, reps: int) -> dict[str, float]:
    """Seconds of each part of a batched extraction, run one after the other in this process
    (the forward passes: median of ``reps``), and of the forward passes under CPU bf16 autocast."""
    parts: dict[str, float] = {}
    start = time.perf_counter()
    images = pixels(encoder, items)
    parts["decode + transform"] = time.perf_counter() - start
    start = time.perf_counter()
    tokens = encoder.tokenize(items.column("text").to_pylist())
    parts["tokenize"] = time.perf_counter() - start

    def forward(encode, batch) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                for i in range(0, len(images), batch_size):
                    encode(select_tokens(batch, torch.arange(i, min(i + batch_size, len(images)))))

        return run

    parts["image forward"] = median_seconds(forward(encoder.encode_images, images), reps)
    parts["text forward"] = median_seconds(forward(encoder.encode_texts, tokens), reps)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parts["image forward, bf16 autocast"] = median_seconds(
            forward(encoder.encode_images, images), reps
        )
        parts["text forward, bf16 autocast"] = median_seconds(
            forward(encoder.encode_texts, tokens), reps
        )
    return parts


def _smaps(pid: int) -> dict[str, int]:
    """The KiB totals of /proc/<pid>/smaps_rollup (Rss, Pss, Private_Dirty...)."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        out[key] = int(value.split()[0])
    return out


def _tree_kib(root_pid: int) -> int:
    """Resident KiB of a process tree, shared pages once: the root's RSS plus the private
    pages of its descendants (a forked worker shares the model with its parent). Linux."""
    pids, total = [root_pid], 0
    while pids:
        pid = pids.pop()
        try:
            for task in Path(f"/proc/{pid}/task").iterdir():
                pids += [int(c) for c in (task / "children").read_text().split()]
            mem = _smaps(pid)
        except (OSError, ValueError):
            continue  # the process ended while we looked
        total += mem["Rss"] if pid == root_pid else mem["Private_Clean"] + mem["Private_Dirty"]
    return total


def child_rss(
    items: pa.Table, n: int, weights: Path, cfg: ExtractConfig, threads: int, workdir: Path
) -> tuple[dict[str, float], float]:
    """Peak memory (MiB) of `lmmrec extract` on ``n`` items (the given ones repeated, new ids)
    in a child process: ``main`` and ``child`` (ru_maxrss of its main process and of its
    largest child) and ``tree`` (the whole process tree, ``_tree_kib`` sampled every 20 ms).
    Also the JPEG MiB."""
    rows = np.arange(n) % items.num_rows
    table = items.take(pa.array(rows))
    table = table.set_column(0, "item_id", pa.array(np.arange(n), pa.int32()))
    table = table.set_column(1, "asin", pa.array([f"R{i:09d}" for i in range(n)]))
    pq.write_table(table, workdir / "rss_items.parquet")
    (workdir / "params.yaml").write_text(
        yaml.safe_dump({"extract": {"batch_size": cfg.batch_size, "num_workers": cfg.num_workers}})
    )
    feature_set = feature_set_of(read_card(weights))
    argv = ["extract", "--feature-set", feature_set, "--items", str(workdir / "rss_items.parquet")]
    argv += ["--weights", str(weights), "--out", str(workdir / "rss_out")]
    argv += ["--params", str(workdir / "params.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with subprocess.Popen(
        [sys.executable, "-c", RSS_CHILD, *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=(workdir / "rss_stderr.txt").open("w"),
        text=True,
    ) as child:
        tree = 0
        while child.poll() is None:
            tree = max(tree, _tree_kib(child.pid))
            time.sleep(0.02)
        stdout = child.stdout.read()
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RSS ")]
    if child.returncode or not lines:
        stderr = (workdir / "rss_stderr.txt").read_text()
        sys.exit(f"`lmmrec {' '.join(argv)}` failed:\n{stderr[-3000:]}")
    kib = {**json.loads(lines[-1][4:]), "tree": tree}
    image_mib = pc.sum(pc.binary_length(table.column("image_bytes"))).as_py()
    return {k: v / 1024 for k, v in kib.items()}, image_mib / 2**20


def time_paths(
    encoder: Encoder, items: pa.Table, cfg: ExtractConfig, reps: int
) -> tuple[dict[str, float], float, float]:
    """Median seconds of the naive loop and of extract_features (with cfg's workers and with
    none), interleaved so that a load spike hits every path alike; and the largest difference
    between the naive and our image and text vectors."""
    serial = ExtractConfig(batch_size=cfg.batch_size, num_workers=0, device="cpu")
    bf16 = ExtractConfig(batch_size=cfg.batch_size, num_workers=0, device="cpu", precision="bf16")
    paths = {
        "naive (1 item at a time)": lambda: naive_extract(encoder, items),
        f"ours (batch {cfg.batch_size}, workers {cfg.num_workers})": lambda: extract_features(
            encoder, items, cfg
        ),
        f"ours (batch {cfg.batch_size}, workers 0)": lambda: extract_features(
            encoder, items, serial
        ),
        f"ours (batch {cfg.batch_size}, workers 0, bf16)": lambda: extract_features(
            encoder, items, bf16
        ),
    }
    warm = items.slice(0, cfg.batch_size)
    naive_extract(encoder, warm)
    extract_features(encoder, warm, serial)
    times: dict[str, list[float]] = {name: [] for name in paths}
    vectors = {}
    for _ in range(reps):
        for name, fn in paths.items():
            start = time.perf_counter()
            vectors[name] = fn()
            times[name].append(time.perf_counter() - start)
    (naive_image, naive_text), *ours = vectors.values()
    exact = [pair for name, pair in zip(paths, [None, *ours], strict=True) if "ours" in name
             and "bf16" not in name]  # fmt: skip
    image_diff = max(float(np.abs(image - naive_image).max()) for image, _ in exact)
    text_diff = max(float(np.abs(text - naive_text).max()) for _, text in exact)
    image_bf16, text_bf16 = ours[-1]
    cosine = min(float((image_bf16 * naive_image).sum(1).min()),
                 float((text_bf16 * naive_text).sum(1).min()))  # fmt: skip
    seconds = {name: statistics.median(t) for name, t in times.items()}
    return seconds, image_diff, text_diff, cosine


def main() -> None:
    defaults = ExtractConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, help="items timed (default: all demo items)")
    parser.add_argument("--encoder-weights", type=Path, help=f"default: {DEMO_WEIGHTS}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--num-workers", type=int, default=defaults.num_workers)
    parser.add_argument("--reps", type=int, default=3, help="timed runs per path (median)")
    parser.add_argument("--rss-items", type=int, help="items of the RSS run (default: --items)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the extraction")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    cfg = ExtractConfig(batch_size=args.batch_size, num_workers=args.num_workers, device="cpu")

    with tempfile.TemporaryDirectory(prefix="bench_extract-") as tmp:
        workdir = Path(tmp)
        items, where = demo_items(args.items, workdir)
        n, rss_n = items.num_rows, args.rss_items or items.num_rows
        encoder, weights, source = demo_encoder(args.encoder_weights, workdir)
        print(
            f"extraction: {n} items from {where}; {encoder.name} {encoder.arch} from {source}; "
            f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} cores, "
            f"load average {load:.2f} at start"
        )
        # peak memory first: the DataLoader workers of the timed runs would count as children
        rss, image_mib = child_rss(items, rss_n, weights, cfg, args.threads, workdir)
        seconds, image_diff, text_diff, cosine = time_paths(encoder, items, cfg, args.reps)
        batch = items.slice(0, cfg.batch_size)
        image_flops, text_flops = flops_per_item(
            encoder, pixels(encoder, batch), encoder.tokenize(batch.column("text").to_pylist())
        )
        peak = matmul_peak_gflops()
        parts = breakdown(encoder, items, cfg.batch_size, args.reps)

    naive = seconds["naive (1 item at a time)"]
    best = min(s for name, s in seconds.items() if name.startswith("ours") and "bf16" not in name)
    best_bf16 = min(s for name, s in seconds.items() if "bf16" in name)
    flops = (image_flops + text_flops) * n
    width = max(len(name) for name in seconds)
    print(f"\n{'path':<{width}}  {'seconds':>8}  {'items/s':>8}  {'GFLOP/s':>8}  {'speedup':>8}")
    for name, s in seconds.items():
        gflops = flops / s / 1e9
        print(f"{name:<{width}}  {s:>8.3f}  {n / s:>8.0f}  {gflops:>8.1f}  {naive / s:>7.2f}x")
    print(f"max |ours - naive| (fp32 paths): image {image_diff:.1e}, text {text_diff:.1e}")
    print(f"bf16 path: lowest cosine to the naive fp32 vector {cosine:.5f}")
    print(
        f"\nFLOPs (FlopCounterMode on one batch of {batch.num_rows}, scaled to {n} items): "
        f"{image_flops / 1e6:.1f} M per image + {text_flops / 1e6:.1f} M per text = "
        f"{flops / 1e9:.1f} GFLOP"
    )
    print(
        f"float32 matmul peak ({PEAK_SIDE}^3, {args.threads} thread(s)): {peak:.0f} GFLOP/s; "
        f"ours at best {flops / best / 1e9:.1f} GFLOP/s = {flops / best / 1e9 / peak:.0%} of "
        f"peak, naive {flops / naive / 1e9 / peak:.0%}"
    )
    print(f"\nwhere the time goes (batched, {cfg.batch_size} per forward, main process):")
    for name, s in parts.items():
        print(f"  {name:<30} {s:>7.3f} s  ({s / n * 1e3:.2f} ms/item)")

    print(
        f"\npeak memory of `lmmrec extract` on {rss_n} items ({image_mib:.1f} MiB of JPEG): "
        f"process tree {rss['tree']:.0f} MiB (main RSS + workers' private pages; target < "
        f"{RSS_TARGET_MIB} MiB: {'ok' if rss['tree'] < RSS_TARGET_MIB else 'OVER'}); "
        f"ru_maxrss of the main process {rss['main']:.0f} MiB, of its largest child "
        f"{rss['child']:.0f} MiB (a worker's RSS counts the pages it shares with the main one)"
    )
    for label, ours in (("exact fp32", best), ("bf16", best_bf16)):
        verdict = "met" if naive / ours >= SPEEDUP_TARGET else "MISSED"
        print(
            f"target ours >= {SPEEDUP_TARGET:.0f}x naive, {label}: {verdict} "
            f"({naive / ours:.2f}x at best)"
        )
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
