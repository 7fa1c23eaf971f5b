"""The report's figures: per-model bars (mean over seeds, CI over users, a dot per seed), and
validation curves (a line per seed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.core.atomic import atomic_path  # noqa: E402
from pipeline.report.significance import Cell, Run, mean_ci, present_settings  # noqa: E402
from pipeline.training import curves  # noqa: E402

CURVE_METRIC = "valid_recall@20"  # what early stopping watches, a curve of every run


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)


# What the bars show, for the report's caption
BAR_CAPTION = (
    "bars: mean over seeds; whiskers: 95% CI over users of the seed-averaged per-user values; "
    "dots: each seed's run"
)


def bar_plot(cells: Sequence[Cell], settings: Sequence[str], metric: str, path: Path) -> None:
    """Grouped bars: per model and setting, the mean of ``metric`` over users and seeds with
    the 95% CI over users of the seed-averaged per-user values, and a dot per seed's mean."""
    columns = present_settings(cells, settings)
    models = sorted({c.model for c in cells if c.setting in columns})
    by_key = {(c.model, c.setting): c for c in cells}
    width = 0.8 / max(len(columns), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(models)), 4))
    for k, setting in enumerate(columns):
        xs, means, halves = [], [], []
        for i, model in enumerate(models):
            cell = by_key.get((model, setting))
            if cell is not None:
                values = cell.per_user(metric)[1]  # [seeds, users]
                mean, half = mean_ci(values.mean(axis=0))
                x = i + (k - (len(columns) - 1) / 2) * width
                xs.append(x)
                means.append(mean)
                halves.append(half)
                seed_means = values.mean(axis=1)
                ax.plot([x] * seed_means.size, seed_means, ".", color="black", markersize=4)
        ax.bar(xs, means, width, yerr=halves, capsize=3, color=f"C{k}", label=setting)
    ax.set_xticks(range(len(models)), models)
    ax.set_ylabel(f"test {metric} (mean over users and seeds)")
    ax.legend(fontsize="small")
    _save(fig, path)


def read_curve(run: Run, metric: str = CURVE_METRIC) -> tuple[list[int], list[float]]:
    """(epochs, values) of ``metric`` from the run's curves; empty when it has none."""
    if run.path is None:
        return [], []
    return curves.read_curve(run.path, metric)


def curve_plot(
    cells: Sequence[Cell], settings: Sequence[str], path: Path, metric: str = CURVE_METRIC
) -> bool:
    """One panel per model, one line per seed of each setting (coloured as in ``bar_plot``;
    other settings, such as ID-only, after them): ``metric`` per epoch. False (and no file)
    when no run logged the metric."""
    curves = {(c.model, c.setting): [read_curve(r, metric) for r in c.runs] for c in cells}
    models = sorted({m for (m, _), runs in curves.items() if any(x for x, _ in runs)})
    if not models:
        return False
    cols = min(3, len(models))
    rows = -(-len(models) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3 * rows), squeeze=False)
    order = present_settings(cells, settings)
    order += sorted({c.setting for c in cells} - set(order))
    for ax, model in zip(axes.flat, models, strict=False):
        for k, setting in enumerate(order):
            drawn = [(x, y) for x, y in curves.get((model, setting), []) if x]
            for j, (x, y) in enumerate(drawn):
                ax.plot(x, y, color=f"C{k}", alpha=0.8, label=setting if j == 0 else None)
        ax.set_title(model)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.legend(fontsize="x-small")
    for ax in axes.flat[len(models) :]:
        ax.axis("off")
    fig.tight_layout()
    _save(fig, path)
    return True
