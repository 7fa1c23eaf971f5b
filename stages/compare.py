"""`lmmrec compare`: the report's tables and paired tests across experiments or folders."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.atomic import write_json
from pipeline.crosscompare import cross_pairs, load_source, merge, setting_order, source_label
from pipeline.report import (
    comparisons_table,
    headline_text,
    outcomes,
    settings_table,
    write_report,
)
from pipeline.significance import ReportConfig, compare, headline
from stages.params import build

log = logging.getLogger(__name__)


def run(params: dict[str, Any], dataset: str, revs: list[str], dirs: list[str], out: Path) -> dict:
    """Compare the runs of ``dataset`` at each of ``revs`` (git revisions or DVC experiment
    names; "workspace" for the files on disk) and in each ``LABEL=PATH`` of ``dirs``."""
    cfg = build(ReportConfig, params.get("report"), "report")
    sources = []
    for rev in revs:
        where = None if rev == "workspace" else rev
        sources.append((rev, load_source(rev, f"models/{dataset}", where)))
    for spec in dirs:
        label, path = source_label(spec)
        sources.append((label, load_source(label, path)))
    if not sources:
        raise ValueError("nothing to compare: give --rev (git rev / experiment) or --dir")
    labels = [label for label, _ in sources]
    if len(set(labels)) != len(labels):
        raise ValueError(f"source labels must differ, got {labels}")
    entries = merge(sources)
    runs = [e.run for e in entries]
    rows = compare(cross_pairs(entries), cfg)
    shares = headline(rows)
    settings = setting_order(entries)
    blocks: list = [
        ("h1", f"Comparison on {dataset}: {', '.join(labels)}"),
        ("p", "Paired two-sided t-tests over test users between encoders at the same stage "
              "and between sources for the same setting (runs whose per-user results are "
              "identical in several sources are shown once); Holm–Bonferroni across all "
              f"{len(rows)} tests; significant at α = {cfg.alpha}. Best per model in bold."),
    ]  # fmt: skip
    for metric in cfg.metrics:
        blocks += [("h2", f"Test {metric}"), ("table", settings_table(runs, {}, settings, metric))]
    blocks += [("h2", "Headline"), ("p", headline_text(shares)), ("h2", "Paired tests")]
    blocks.append(("table", comparisons_table(rows)) if rows else ("p", "No pairable runs."))
    write_report(blocks, out, "compare", f"lmmrec comparison: {dataset}")
    result = {
        "runs": {f"{r.setting}/{r.model}": dict(r.metrics) for r in runs},
        "headline": shares,
        "comparisons": outcomes(rows),
    }
    write_json(out / "summary.json", result)
    log.info("compare: %d runs from %s, %d tests -> %s", len(runs), labels, len(rows), out)
    return result
