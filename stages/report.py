"""report stage: paired significance tests between every trained run and the ID-only ones."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_path, write_json
from pipeline.baselines import BASELINES, evaluate_baseline
from pipeline.interactions import load_interactions
from pipeline.report import render_markdown, summary
from pipeline.schemas import ID_ONLY
from pipeline.significance import ReportConfig, compare, load_runs
from stages.params import build, require

log = logging.getLogger(__name__)


def run(params: dict[str, Any], interactions: Path, models: Path, out: Path) -> dict:
    """Compare each feature-based run with each ID-only reference; write the report to ``out``."""
    cfg = build(ReportConfig, params.get("report"), "report")
    runs = load_runs(models)
    if not runs:
        raise FileNotFoundError(f"no trained runs (per_user.parquet) under {models}")
    data = load_interactions(interactions)
    topk = tuple(require(params, "eval.topk"))
    seed = require(params, "seed")
    baselines = {
        name: evaluate_baseline(name, data, "test", topk, seed).means for name in BASELINES
    }
    references = [r for r in runs if r.setting == ID_ONLY]
    pairs = [(r, ref) for r in runs if r.setting != ID_ONLY for ref in references]
    rows = compare(pairs, cfg)
    with atomic_path(out / "significance.md") as tmp:
        tmp.write_text(render_markdown(require(params, "dataset"), runs, baselines, rows, cfg))
    result = summary(runs, baselines, rows)
    write_json(out / "summary.json", result)
    log.info("report: %d runs, %d tests -> %s", len(runs), len(rows), out)
    return result
