"""Stage commands started cold against warm starts (stages/warm.py), in one run; see
benchmarks/README.md.

    python benchmarks/bench_warm.py              # 5 alternating rounds
    python benchmarks/bench_warm.py --rounds 9

Runs stage commands as DVC does, through the installed `lmmrec` console script, on the demo's
data (training cut to one epoch): each once with `LMMREC_WARM=0` (a new process imports
everything) and once with warm starts on (the command runs in a fork of a server that has
imported torch & co.), in alternating order. The server is started and given time to import
its extras before the first round, as between the stages of a `dvc repro`; its start alone is
timed first. Every warm output is checked to be byte-identical to the cold one. Needs the
demo's outputs (`make repro`). Not a test: it reports timings and ratios measured in this run,
on this machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from stages import warm

ROOT = Path(__file__).resolve().parents[1]
LMMREC = str(Path(sys.executable).parent / "lmmrec")
DATA = ROOT / "data/processed/demo"


def commands(params: Path) -> dict[str, list[str]]:
    """Name -> `lmmrec` arguments but `--out`: two training stages and a CLIP extraction."""
    train = ["train", "--params", str(params), "--interactions", str(DATA / "interactions.parquet")]
    return {
        "train bpr (id)": [*train, "--model", "bpr", "--feature-set", "id"],
        "train vbpr (clip-finetuned)": [
            *train, "--model", "vbpr", "--feature-set", "clip-finetuned",
            "--features", str(ROOT / "features/demo/clip-finetuned"),
        ],
        "extract clip-pretrained": [
            "extract", "--params", str(params), "--feature-set", "clip-pretrained",
            "--items", str(DATA / "items.parquet"),
            "--weights", str(ROOT / "models/weights/clip-pretrained"),
        ],
    }  # fmt: skip


def run(args: list[str], out: Path, env: dict[str, str]) -> float:
    """Wall seconds of one `lmmrec` command; exits with its error output when it fails."""
    start = time.perf_counter()
    done = subprocess.run([LMMREC, *args, "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True)  # fmt: skip
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"`lmmrec {' '.join(args)}` failed:\n{done.stderr[-3000:]}")
    return wall


def same_bytes(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    return files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and all(
        (a / f).read_bytes() == (b / f).read_bytes() for f in files
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="cold/warm alternations (5)")
    args = parser.parse_args()
    for needed in (DATA / "items.parquet", ROOT / "features/demo/clip-finetuned"):
        if not needed.exists():
            sys.exit(f"{needed} is missing: run `make repro` first")
    with tempfile.TemporaryDirectory(prefix="bench_warm_", dir="/tmp") as tmp_name:
        tmp = Path(tmp_name)
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        params["train"].update(max_epochs=1, min_epochs=0)
        (tmp / "params.yaml").write_text(yaml.safe_dump(params))
        sockets = tmp / "s"
        base = {**os.environ, "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"}
        cold_env = {**base, "LMMREC_WARM": "0"}
        warm_env = {**base, "LMMREC_WARM": "1", "LMMREC_WARM_DIR": str(sockets)}
        runs = commands(tmp / "params.yaml")
        first_args = runs["train bpr (id)"]
        first = run(first_args, tmp / "first", warm_env)
        time.sleep(15)  # the server imports its extras while idle
        print(f"load average {os.getloadavg()[0]:.2f}; {args.rounds} rounds; the first warm "
              f"command (it starts the server): {first:.2f} s", flush=True)  # fmt: skip
        print("| command | cold s | warm s | saved s | cold/warm | same bytes |")
        print("|---|---:|---:|---:|---:|---|")
        try:
            for name, cmd in runs.items():
                walls: dict[str, list[float]] = {"cold": [], "warm": []}
                same = True
                for r in range(args.rounds):
                    order = [("cold", cold_env), ("warm", warm_env)]
                    for side, env in order if r % 2 == 0 else order[::-1]:
                        walls[side].append(run(cmd, tmp / f"{side}-{r}", env))
                    same = same and same_bytes(tmp / f"cold-{r}", tmp / f"warm-{r}")
                    for side in ("cold", "warm"):
                        shutil.rmtree(tmp / f"{side}-{r}")
                c, w = statistics.median(walls["cold"]), statistics.median(walls["warm"])
                print(f"| {name} | {c:.2f} | {w:.2f} | {c - w:.2f} | {c / w:.2f}x | "
                      f"{'yes' if same else 'NO'} |", flush=True)  # fmt: skip
        finally:
            for pid in warm.servers(str(sockets)):
                os.killpg(pid, signal.SIGTERM)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
