"""A run's per-epoch curves, written in DVCLive's layout so `dvc plots` and the report read them.

In a run's folder, ``dvclive/plots/metrics/<metric>.tsv`` holds a ``step``/``<metric>`` row for
each epoch that logged the metric (steps count epochs from 0) and ``dvclive/metrics.json`` the
latest value of each metric with the last step. Written once, from the run's history, when the
run ends: the run's folder is a temporary one until then, so nothing could read the curves
earlier, and no logger has to open the DVC repository (DVCLive's probe cost ~0.8 s a stage).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

CURVES_DIR = "dvclive"  # in a run's folder; dvc.yaml's plots name it
PLOTS = Path("plots") / "metrics"  # DVCLive's folder of per-metric TSV files, in CURVES_DIR
SUMMARY = "metrics.json"  # in CURVES_DIR


def curve_file(run_folder: str | Path, metric: str) -> Path:
    """The TSV file of ``metric``'s curve in the run folder ``run_folder``."""
    return Path(run_folder) / CURVES_DIR / PLOTS / f"{metric}.tsv"


def write_curves(run_folder: str | Path, history: Sequence[Mapping[str, float]]) -> None:
    """Write the curves of ``history`` (one mapping of metric -> value per epoch, in order)
    into ``run_folder``'s ``CURVES_DIR``; nothing for an empty history."""
    if not history:
        return
    rows: dict[str, list[str]] = {}
    summary: dict[str, float | int] = {}
    for step, row in enumerate(history):
        for name, value in row.items():
            summary[name] = float(value)
            rows.setdefault(name, [f"step\t{name}"]).append(f"{step}\t{summary[name]!r}")
    for name, lines in rows.items():
        path = curve_file(run_folder, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary["step"] = len(history) - 1
    text = json.dumps(summary, indent=4) + "\n"
    (Path(run_folder) / CURVES_DIR / SUMMARY).write_text(text, encoding="utf-8")


def read_curve(run_folder: str | Path, metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``metric``'s curve in ``run_folder``; empty when it has none."""
    path = curve_file(run_folder, metric)
    if not path.is_file():
        return [], []
    with path.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [int(r["step"]) for r in rows], [float(r[metric]) for r in rows]
