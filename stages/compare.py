"""`lmmrec compare`: the report's tables, spread and tests across users and seeds, between
experiments or folders (see ``pipeline.report.compare``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.report.compare import compare_experiments
from pipeline.report.significance import ReportConfig
from stages.params import build


def run(params: dict[str, Any], dataset: str, revs: list[str], dirs: list[str], out: Path) -> dict:
    """Compare the runs of ``dataset`` at each of ``revs`` (git revisions or DVC experiment
    names; "workspace" for the files on disk) and in each ``LABEL=PATH`` of ``dirs``."""
    cfg = build(ReportConfig, params.get("report"), "report")
    return compare_experiments(dataset, revs, dirs, cfg, out)
