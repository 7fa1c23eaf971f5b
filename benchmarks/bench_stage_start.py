"""The fixed cost of a training stage, against the code of an earlier commit; see
benchmarks/README.md.

    python benchmarks/bench_stage_start.py                     # vbpr on clip-finetuned, bpr
    python benchmarks/bench_stage_start.py --base-rev fc2e3fb --rounds 7

Runs the `train` stage command as DVC does (a new process: Python, imports, the params check,
the data and features, the model, one epoch, the test, the outputs) with the demo's data,
params cut to one epoch, once with ``pipeline``/``stages`` from this checkout and once from a
``git worktree`` of ``--base-rev``, in alternating rounds. The process's wall seconds minus
the training it logs ("trained and tested in X s") is its fixed cost: what each of the demo's
~40 training stages pays besides training. Needs the demo's outputs (`make repro`).
Not a test: it reports timings and ratios measured in this run, on this machine.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from timing import base_tree, ensure_worktree

ROOT = Path(__file__).resolve().parents[1]
TRAINED = re.compile(r"trained and tested in ([0-9.]+) s")
RUNS = {  # model -> feature set (id: ID-only)
    "vbpr": "clip-finetuned",
    "bpr": "id",
}


def one_epoch_params(folder: Path) -> Path:
    """The project's params.yaml with every run cut to one epoch."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update(max_epochs=1, min_epochs=0)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def run_stage(
    tree: Path, model: str, feature_set: str, params: Path, out: Path
) -> tuple[float, float]:
    """(wall seconds, logged training seconds) of one `lmmrec train` process on code ``tree``."""
    data = ROOT / "data/processed/demo/interactions.parquet"
    cmd = [
        sys.executable, "-c", "from stages.cli import main; main()", "train",
        "--params", str(params), "--model", model, "--feature-set", feature_set,
        "--interactions", str(data), "--out", str(out),
    ]  # fmt: skip
    if feature_set != "id":
        cmd += ["--features", str(ROOT / "features/demo" / feature_set)]
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"}
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{tree}: `{' '.join(cmd)}` failed:\n{done.stderr[-3000:]}")
    trained = TRAINED.search(done.stderr)
    return wall, float(trained.group(1)) if trained else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-rev", default="fc2e3fb", help="the code before (default fc2e3fb)")
    parser.add_argument(
        "--base-tree", type=Path, help="its git worktree (default: ../base-<rev>, made if missing)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="alternations old/new (default 5)")
    args = parser.parse_args()
    for feature_set in RUNS.values():
        if feature_set != "id" and not (ROOT / "features/demo" / feature_set).is_dir():
            sys.exit(f"features/demo/{feature_set} is missing: run `make repro` first")
    args.base_tree = base_tree(args.base_tree, args.base_rev)
    ensure_worktree(args.base_tree, args.base_rev)
    sides = {"old": args.base_tree, "new": ROOT}
    print(f"old = {args.base_rev} ({args.base_tree}), new = {ROOT}; {args.rounds} rounds, "
          f"one epoch a run, load average {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
    print("| run | old wall s | new wall s | old fixed s | new fixed s | fixed old/new |")
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="bench_stage_start_") as tmp:
        params = one_epoch_params(Path(tmp))
        for model, feature_set in RUNS.items():
            walls: dict[str, list[float]] = {side: [] for side in sides}
            fixed: dict[str, list[float]] = {side: [] for side in sides}
            for r in range(args.rounds):
                order = list(sides.items()) if r % 2 == 0 else list(sides.items())[::-1]
                for side, tree in order:
                    wall, trained = run_stage(
                        tree, model, feature_set, params, Path(tmp) / f"{side}-{model}-{r}"
                    )
                    walls[side].append(wall)
                    fixed[side].append(wall - trained)
            med = {side: (statistics.median(walls[side]), statistics.median(fixed[side]))
                   for side in sides}  # fmt: skip
            print(f"| {model} ({feature_set}) | {med['old'][0]:.2f} | {med['new'][0]:.2f} | "
                  f"{med['old'][1]:.2f} | {med['new'][1]:.2f} | "
                  f"{med['old'][1] / med['new'][1]:.2f}x |", flush=True)  # fmt: skip
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
