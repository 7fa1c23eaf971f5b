"""DVC's own reading of dvc.lock, with ruamel.yaml's pure-Python parser against its C parser.

    python benchmarks/bench_dvc_yaml.py            # needs the project's venv (ruamel.yaml.clib)

DVC loads dvc.lock with ruamel.yaml's safe loader for every stage it checks (`dvc status`,
and before and after each stage of `dvc repro`); the project depends on `ruamel.yaml.clib`
so that loader runs in C. Measured in one run, alternating: one parse of this checkout's
dvc.lock each way, and a whole `dvc status` each way (the pure side forces ruamel's
``pure=True`` in the `dvc` process, nothing else changes). Not a test: the ratios hold for
the machine and the run that printed them.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from ruamel.yaml import YAML
from timing import ROOT

PURE = (
    "import ruamel.yaml.main as m; init = m.YAML.__init__; "
    "m.YAML.__init__ = lambda self, *a, **k: init(self, *a, **{**k, 'pure': True}); "
)
DVC = "import sys; from dvc.cli import main; sys.exit(main(['status', '-q']))"


def parse_seconds(text: str, pure: bool) -> float:
    """Seconds of one safe-mode parse of ``text``."""
    yaml = YAML(typ="safe", pure=pure)
    start = time.perf_counter()
    yaml.load(text)
    return time.perf_counter() - start


def status_seconds(pure: bool) -> float:
    """Seconds of one `dvc status` in the project root, with ruamel forced pure or not."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", (PURE if pure else "") + DVC], cwd=ROOT,
                   capture_output=True, check=False)  # fmt: skip
    return time.perf_counter() - start


def main() -> int:
    """Parse the options, time both ways alternately, print the medians and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="alternations (median of each)")
    opts = parser.parse_args()
    if YAML(typ="safe").Parser.__module__.startswith("ruamel.yaml.parser"):
        sys.exit("ruamel.yaml.clib is not installed here: run `make install`")
    lock = ROOT / "dvc.lock"
    text = lock.read_text()
    times: dict[tuple[str, bool], list[float]] = {}
    for _ in range(opts.reps):
        for pure in (True, False):
            times.setdefault(("parse", pure), []).append(parse_seconds(text, pure))
            times.setdefault(("status", pure), []).append(status_seconds(pure))
    print(f"dvc.lock: {text.count(chr(10))} lines; medians of {opts.reps} alternations")
    for what in ("parse", "status"):
        slow, fast = (statistics.median(times[(what, p)]) for p in (True, False))
        label = "one safe parse" if what == "parse" else "`dvc status`"
        print(f"{label:15s} pure {slow:6.3f} s   C {fast:6.3f} s   {slow / fast:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
