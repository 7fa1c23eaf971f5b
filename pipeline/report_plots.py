"""The report's figures: per-model bars with confidence intervals, and validation curves."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.atomic import atomic_path  # noqa: E402
from pipeline.significance import Run, mean_ci, present_settings  # noqa: E402

CURVE_METRIC = "valid_recall@20"  # what early stopping watches, logged each epoch by dvclive


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)


def bar_plot(runs: Sequence[Run], settings: Sequence[str], metric: str, path: Path) -> None:
    """Grouped bars: per model, the mean per-user ``metric`` of each setting with its 95% CI."""
    columns = present_settings(runs, settings)
    models = sorted({r.model for r in runs if r.setting in columns})
    by_key = {(r.model, r.setting): r for r in runs}
    width = 0.8 / max(len(columns), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(models)), 4))
    for k, setting in enumerate(columns):
        xs, means, halves = [], [], []
        for i, model in enumerate(models):
            run = by_key.get((model, setting))
            if run is not None:
                mean, half = mean_ci(run.per_user[metric].to_numpy())
                xs.append(i + (k - (len(columns) - 1) / 2) * width)
                means.append(mean)
                halves.append(half)
        ax.bar(xs, means, width, yerr=halves, capsize=3, color=f"C{k}", label=setting)
    ax.set_xticks(range(len(models)), models)
    ax.set_ylabel(f"test {metric} (mean over users, 95% CI)")
    ax.legend(fontsize="small")
    _save(fig, path)


def read_curve(run: Run, metric: str = CURVE_METRIC) -> tuple[list[int], list[float]]:
    """(epochs, values) of ``metric`` from the run's dvclive log; empty when it has none."""
    if run.path is None:
        return [], []
    tsv = run.path / "dvclive" / "plots" / "metrics" / f"{metric}.tsv"
    if not tsv.is_file():
        return [], []
    with tsv.open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [int(r["step"]) for r in rows], [float(r[metric]) for r in rows]


def curve_plot(
    runs: Sequence[Run], settings: Sequence[str], path: Path, metric: str = CURVE_METRIC
) -> bool:
    """One panel per model, one line per setting (coloured as in ``bar_plot``; other settings,
    such as ID-only, after them): ``metric`` per epoch. False (and no file) when no run logged
    the metric."""
    curves = {(r.model, r.setting): read_curve(r, metric) for r in runs}
    models = sorted({m for (m, _), (x, _) in curves.items() if x})
    if not models:
        return False
    cols = min(3, len(models))
    rows = -(-len(models) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3 * rows), squeeze=False)
    order = present_settings(runs, settings)
    order += sorted({r.setting for r in runs} - set(order))
    for ax, model in zip(axes.flat, models, strict=False):
        for k, setting in enumerate(order):
            x, y = curves.get((model, setting), ([], []))
            if x:
                ax.plot(x, y, color=f"C{k}", label=setting)
        ax.set_title(model)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.legend(fontsize="x-small")
    for ax in axes.flat[len(models) :]:
        ax.axis("off")
    fig.tight_layout()
    _save(fig, path)
    return True
