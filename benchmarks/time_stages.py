"""Wall seconds per DVC stage of one `dvc repro`, and the total; see benchmarks/README.md.

    python benchmarks/time_stages.py                       # dvc repro (what changed), timed
    python benchmarks/time_stages.py -f                    # every stage, forced
    python benchmarks/time_stages.py -f -s weights finetune --out /tmp/stages.md
    python benchmarks/time_stages.py --repo ../old-demo     # another checkout, with its venv

One `dvc repro` process, as a user runs it, with its output read line by line as it comes:
a stage's seconds run from DVC's first line about it ("Running stage 'x':", "Stage 'x' didn't
change, skipping", "Stage 'x' is cached") to the first line about the next stage (or DVC's
exit), so they include DVC's own per-stage work (checking the stage, hashing and caching its
outputs, updating dvc.lock) and the command's process start and imports. DVC's start-up
before the first stage is its own row; the rows add up to the total. Nothing is written
into DVC's outputs: the table goes to stdout and, with --out, to the file named.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STAGE_LINE = re.compile(
    r"^(?:Running stage '(?P<ran>[^']+)':"
    r"|Stage '(?P<skipped>[^']+)' didn't change, skipping"
    r"|Stage '(?P<cached>[^']+)' is cached - skipping run)"
)
START_UP = "(dvc start-up)"


@dataclass
class Segment:
    """One row of the table: a stage (or DVC's start-up) and when its first line came."""

    name: str
    status: str
    start: float
    seconds: float = 0.0


def stage_event(line: str) -> tuple[str, str] | None:
    """``(stage, status)`` if ``line`` is DVC's first line about a stage, else None."""
    match = STAGE_LINE.match(line.strip())
    if not match:
        return None
    for status in ("ran", "skipped", "cached"):
        if match.group(status):
            return match.group(status), status
    return None


def venv_bin(repo: Path) -> Path:
    """The bin folder whose ``dvc`` and ``lmmrec`` a repro in ``repo`` runs: this Python's for
    this checkout, the checkout's own ``.venv`` for another one (its commit's code: this
    checkout's ``lmmrec`` would run today's code on the old stages)."""
    if repo.resolve() == ROOT:
        return Path(sys.executable).parent
    own = repo / ".venv" / "bin"
    if not (own / "dvc").exists() or not (own / "lmmrec").exists():
        raise SystemExit(f"--repo {repo}: no .venv with dvc and lmmrec there; run `make install` "
                         "in it first")  # fmt: skip
    return own


def time_repro(
    args: list[str], echo: bool = True, repo: Path = ROOT
) -> tuple[list[Segment], float, int]:
    """Run ``dvc repro <args>`` in the checkout ``repo``; return the segments, the total wall
    seconds and DVC's exit status. ``echo`` copies DVC's output to stderr as it comes."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DVC_NO_ANALYTICS": "1"}
    bin_dir = venv_bin(repo)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"  # stages call `lmmrec`
    start = time.perf_counter()
    segments = [Segment(START_UP, "", start)]
    proc = subprocess.Popen(
        [str(bin_dir / "dvc"), "repro", *args],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        now = time.perf_counter()
        if echo:
            sys.stderr.write(line)
        event = stage_event(line)
        if event and event[0] != segments[-1].name:
            segments.append(Segment(event[0], event[1], now))
    rc = proc.wait()
    end = time.perf_counter()
    for segment, following in zip(segments, segments[1:] + [Segment("", "", end)], strict=True):
        segment.seconds = following.start - segment.start
    return segments, end - start, rc


def table(segments: list[Segment], total: float, command: str) -> str:
    """A markdown table of the segments, each with its share of the total."""
    lines = [
        f"`{command}`",
        "",
        "| stage | status | seconds | share |",
        "|---|---|---:|---:|",
    ]
    for s in segments:
        share = s.seconds / total if total else 0.0
        lines.append(f"| {s.name} | {s.status} | {s.seconds:.1f} | {share:.1%} |")
    ran = sum(s.seconds for s in segments if s.status == "ran")
    lines.append(
        f"| **total** | {sum(s.status == 'ran' for s in segments)} ran | **{total:.1f}** | 100% |"
    )
    lines += ["", f"stages that ran: {ran:.1f} s; total {total / 60:.1f} min"]
    return "\n".join(lines) + "\n"


def main() -> int:
    """Parse the options, run and time `dvc repro`, print (and optionally write) the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stages", nargs="*", help="stages or targets for dvc repro (default: all)")
    parser.add_argument("-f", "--force", action="store_true", help="dvc repro -f")
    parser.add_argument(
        "-s", "--single-item", action="store_true", help="dvc repro -s: only the named stages"
    )
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    parser.add_argument("-q", "--quiet", action="store_true", help="do not echo DVC's output")
    parser.add_argument(
        "--repo", type=Path, default=ROOT,
        help="the checkout to run `dvc repro` in (default: this one); another checkout needs its "
        "own .venv (`make install` there): e.g. a fresh clone of an older commit, to time its "
        "demo on this machine",
    )  # fmt: skip
    opts = parser.parse_args()
    if not (opts.repo / "dvc.yaml").is_file():
        parser.error(f"--repo {opts.repo}: no dvc.yaml there")
    args = (["-f"] if opts.force else []) + (["-s"] if opts.single_item else []) + opts.stages
    segments, total, rc = time_repro(args, echo=not opts.quiet, repo=opts.repo.resolve())
    text = table(segments, total, " ".join(["dvc", "repro", *args]))
    if rc:
        text += f"\ndvc repro FAILED (exit status {rc}): the last row runs up to the failure\n"
    print(text, end="")
    if opts.out:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(text)
    return rc


if __name__ == "__main__":
    sys.exit(main())
