"""The report of one encoder's runs: the paper's table (mean and spread over seeds) and
comparisons (tested across users and seeds), tests against the ID-only references, the
run-to-run spread and the plots; significance.md, significance.html, plots/ and summary.json."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from pipeline.core.atomic import write_json
from pipeline.data.interactions import load_interactions
from pipeline.features.names import ID_ONLY, encoder_settings
from pipeline.report.plots import BAR_CAPTION, bar_plot, curve_plot
from pipeline.report.significance import (
    Cell,
    ReportConfig,
    cells,
    compare,
    headline,
    load_runs,
    paper_pairs,
)
from pipeline.report.tables import report_blocks, summary, write_report
from pipeline.training.baselines import BASELINES, evaluate_baseline

log = logging.getLogger(__name__)


def reference_pairs(kept: Sequence[Cell]) -> list[tuple[str, Cell, Cell]]:
    """(label, A, B) pairs testing every feature run A against each ID-only reference B."""
    references = [c for c in kept if c.setting == ID_ONLY]
    return [(f"vs {ref.model}", c, ref) for c in kept if c.setting != ID_ONLY for ref in references]


def paper_report(
    dataset: str,
    encoder: str,
    interactions: Path,
    models: Path,
    out: Path,
    cfg: ReportConfig,
    topk: Sequence[int],
    seed: int,
) -> dict:
    """Test the runs under ``models`` that belong to ``encoder`` (and the ID-only references;
    other encoders' runs are left out with a warning) and write the report into ``out``; the
    popularity and random baselines are scored on ``interactions`` with ``seed``. Returns
    what summary.json holds."""
    settings = encoder_settings(encoder)
    found = cells(load_runs(models))
    kept = [c for c in found if c.setting in settings or c.setting == ID_ONLY]
    ignored = sorted({c.setting for c in found} - {c.setting for c in kept})
    if ignored:
        log.warning("report for encoder %s leaves out the runs of %s", encoder, ignored)
    if not kept:
        raise FileNotFoundError(f"no trained runs (per_user.parquet) for {settings} under {models}")
    data = load_interactions(interactions)
    topk = tuple(topk)
    baselines = {
        name: evaluate_baseline(name, data, "test", topk, seed).means for name in BASELINES
    }
    paper_rows = compare(paper_pairs(kept, encoder), cfg)
    reference_rows = compare(reference_pairs(kept), cfg)
    shares = headline(paper_rows)

    plots = []
    for metric in cfg.metrics:
        name = f"plots/bars_{metric.replace('@', '_at_')}.png"
        bar_plot(kept, settings, metric, out / name)
        plots.append((name, f"Test {metric} per model and feature setting ({BAR_CAPTION})"))
    if curve_plot(kept, settings, out / "plots/valid_curves.png"):
        plots.append(("plots/valid_curves.png", "Validation Recall@20 per epoch, a line per seed"))
    full = [f"{m}@{k}" for m in ("recall", "ndcg") for k in topk]
    blocks = report_blocks(
        dataset, kept, baselines, settings, paper_rows, reference_rows, shares, cfg, full, plots
    )
    write_report(blocks, out, "significance", f"lmmrec significance report: {dataset}")
    result = summary(kept, baselines, paper_rows, reference_rows, shares, cfg.metrics)
    write_json(out / "summary.json", result)
    log.info(
        "report: %d runs in %d cells, %d paper tests, %d reference tests -> %s",
        sum(len(c.runs) for c in kept), len(kept), len(paper_rows), len(reference_rows), out,
    )  # fmt: skip
    return result
