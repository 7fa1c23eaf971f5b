"""Timing helper shared by the benchmark scripts (run from this folder, so importable as-is)."""

from __future__ import annotations

import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def median_seconds(fn: Callable[[], object], reps: int) -> float:
    """Median wall-clock of ``reps`` calls of ``fn``."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def chosen_models(spec: str | None) -> list[str]:
    """The registered recommenders named in a comma-separated ``--models`` value (all when
    empty); exits naming any unknown one and what is registered."""
    from pipeline.recommenders import list_recommenders

    known = list_recommenders()
    names = spec.split(",") if spec else known
    unknown = sorted(set(names) - set(known))
    if unknown:
        sys.exit(f"unknown model(s) {unknown}; registered: {known}")
    return names


def _commit(repo: Path, rev: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--verify", f"{rev}^{{commit}}"],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode:
        sys.exit(f"{rev!r} is not a commit of {repo}: {done.stderr.strip()}")
    return done.stdout.strip()


def base_tree(tree: Path | None, rev: str) -> Path:
    """Where the old side's worktree lives: ``tree``, or by default a folder beside this
    checkout named after ``rev`` (so that two revisions never share one)."""
    return (tree or ROOT.parent / f"base-{rev}").resolve()


def ensure_worktree(tree: Path, rev: str) -> None:
    """Create a detached git worktree of this repository at ``rev`` in ``tree`` when missing
    (the old side of an old-against-new benchmark); exits when ``tree`` holds another commit,
    which would be measured as ``rev`` otherwise."""
    wanted = _commit(ROOT, rev)
    if not (tree / "pipeline").is_dir():
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), wanted], check=True
        )
    elif (found := _commit(tree, "HEAD")) != wanted:
        sys.exit(
            f"{tree} holds commit {found[:12]}, not {rev} ({wanted[:12]}): pass another "
            f"--base-tree, or remove it (git worktree remove {tree})"
        )


def peak_rss_mib() -> float:
    """This process's peak resident memory so far: VmHWM, which starts afresh at exec (Linux's
    ru_maxrss would carry over the parent's peak into a worker started by subprocess)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
