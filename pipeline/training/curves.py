"""A run's per-epoch curves, written in DVCLive's layout so `dvc plots` and the report read them.

``<dir>/plots/metrics/<metric>.tsv`` holds a ``step``/``<metric>`` row for each epoch that
logged the metric (steps count epochs from 0) and ``<dir>/metrics.json`` the latest value of
each metric with the last step. Written once, from the run's history, when the run ends: the
run's folder is a temporary one until then, so nothing could read the curves earlier, and no
logger has to open the DVC repository (DVCLive's probe cost ~0.8 s a stage).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

PLOTS = Path("plots") / "metrics"  # DVCLive's folder of per-metric TSV files
SUMMARY = "metrics.json"


def write_curves(directory: str | Path, history: Sequence[Mapping[str, float]]) -> None:
    """Write the curves of ``history`` (one mapping of metric -> value per epoch, in order)
    under ``directory``; nothing for an empty history."""
    if not history:
        return
    directory = Path(directory)
    (directory / PLOTS).mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[str]] = {}
    summary: dict[str, float | int] = {}
    for step, row in enumerate(history):
        for name, value in row.items():
            rows.setdefault(name, [f"step\t{name}"]).append(f"{step}\t{float(value)!r}")
            summary[name] = float(value)
    for name, lines in rows.items():
        (directory / PLOTS / f"{name}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary["step"] = len(history) - 1
    (directory / SUMMARY).write_text(json.dumps(summary, indent=4) + "\n", encoding="utf-8")
