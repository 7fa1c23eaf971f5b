"""`lmmrec compare`: the report's tables, spread and tests across users and seeds, between
experiments or folders."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.core.atomic import write_json
from pipeline.report.compare import cross_pairs, load_source, merge, setting_order, source_label
from pipeline.report.significance import ReportConfig, compare, headline
from pipeline.report.tables import (
    cell_summary,
    comparisons_table,
    headline_text,
    method_text,
    outcomes,
    seed_note,
    seeds_text,
    settings_table,
    spread_blocks,
    write_report,
)
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
    cells = [e.cell for e in entries]
    rows = compare(cross_pairs(entries), cfg)
    shares = headline(rows)
    settings = setting_order(entries)
    blocks: list = [
        ("h1", f"Comparison on {dataset}: {', '.join(labels)}"),
        ("p", "Tests between encoders at the same stage and between sources for the same "
              "setting (cells whose per-user results are identical in several sources are "
              f"shown once); Holm–Bonferroni across all {len(rows)} tests. {seeds_text(cells)} "
              "Tables: the mean over seeds, with the smallest and largest run in brackets when "
              "there are several; best mean per model in bold. " + method_text(cfg.alpha)),
    ]  # fmt: skip
    note = seed_note(rows)
    if note:
        blocks.append(("p", note))
    for metric in cfg.metrics:
        blocks += [("h2", f"Test {metric}"), ("table", settings_table(cells, {}, settings, metric))]
    blocks += spread_blocks(cells, settings, cfg.metrics)
    blocks += [("h2", "Headline"), ("p", headline_text(shares)), ("h2", "Tests")]
    blocks.append(("table", comparisons_table(rows)) if rows else ("p", "No pairable runs."))
    write_report(blocks, out, "compare", f"lmmrec comparison: {dataset}")
    result = {
        **cell_summary(cells, cfg.metrics),
        "headline": shares,
        "comparisons": outcomes(rows),
        "seed_note": note,
    }
    write_json(out / "summary.json", result)
    log.info("compare: %d cells from %s, %d tests -> %s", len(cells), labels, len(rows), out)
    return result
