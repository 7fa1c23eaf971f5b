"""report stage: the paper's table and comparisons for the params' encoder, tests against the
ID-only references, the run-to-run spread, plots (see ``pipeline.report.paper``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.report.paper import paper_report
from pipeline.report.significance import ReportConfig
from stages.params import build, require


def run(params: dict[str, Any], interactions: Path, models: Path, out: Path) -> dict:
    """Test the runs under ``models`` that belong to the params' encoder; write ``out``."""
    cfg = build(ReportConfig, params.get("report"), "report")
    return paper_report(
        require(params, "dataset"),
        require(params, "encoder"),
        interactions,
        models,
        out,
        cfg,
        require(params, "eval.topk"),
        require(params, "seed"),
    )
