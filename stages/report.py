"""report stage: the paper's table (mean and spread over seeds) and comparisons (tested across
users and seeds) for the params' encoder, tests against the ID-only references, the
run-to-run spread, plots; significance.md, significance.html, plots/ and summary.json."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.core.atomic import write_json
from pipeline.data.interactions import load_interactions
from pipeline.data.schemas import ID_ONLY
from pipeline.report.plots import BAR_CAPTION, bar_plot, curve_plot
from pipeline.report.significance import (
    ReportConfig,
    cells,
    compare,
    encoder_settings,
    headline,
    load_runs,
    paper_pairs,
)
from pipeline.report.tables import report_blocks, summary, write_report
from pipeline.training.baselines import BASELINES, evaluate_baseline
from stages.params import build, require

log = logging.getLogger(__name__)


def run(params: dict[str, Any], interactions: Path, models: Path, out: Path) -> dict:
    """Test the runs under ``models`` that belong to the params' encoder; write ``out``."""
    cfg = build(ReportConfig, params.get("report"), "report")
    encoder = require(params, "encoder")
    settings = encoder_settings(encoder)
    found = cells(load_runs(models))
    kept = [c for c in found if c.setting in settings or c.setting == ID_ONLY]
    ignored = sorted({c.setting for c in found} - {c.setting for c in kept})
    if ignored:
        log.warning("report for encoder %s leaves out the runs of %s", encoder, ignored)
    if not kept:
        raise FileNotFoundError(f"no trained runs (per_user.parquet) for {settings} under {models}")
    data = load_interactions(interactions)
    topk = tuple(require(params, "eval.topk"))
    seed = require(params, "seed")
    baselines = {
        name: evaluate_baseline(name, data, "test", topk, seed).means for name in BASELINES
    }
    paper_rows = compare(paper_pairs(kept, encoder), cfg)
    references = [c for c in kept if c.setting == ID_ONLY]
    pairs = [
        (f"vs {ref.model}", c, ref) for c in kept if c.setting != ID_ONLY for ref in references
    ]
    reference_rows = compare(pairs, cfg)
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
        require(params, "dataset"), kept, baselines, settings, paper_rows, reference_rows,
        shares, cfg, full, plots,
    )  # fmt: skip
    write_report(blocks, out, "significance", f"lmmrec significance report: {params['dataset']}")
    result = summary(kept, baselines, paper_rows, reference_rows, shares, cfg.metrics)
    write_json(out / "summary.json", result)
    log.info(
        "report: %d runs in %d cells, %d paper tests, %d reference tests -> %s",
        sum(len(c.runs) for c in kept), len(kept), len(paper_rows), len(reference_rows), out,
    )  # fmt: skip
    return result
