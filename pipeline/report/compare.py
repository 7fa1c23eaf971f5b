"""Comparing experiments: the report's tables and tests across users and seeds between git
revisions, DVC experiments or folders, for example CLIP vs VLMo after
`dvc exp run -S encoder=vlmo`."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.core.atomic import write_json
from pipeline.encoders.base import BASELINE
from pipeline.features.names import E2E, ID_ONLY, LMM_STAGES, encoder_stage
from pipeline.report.significance import (
    Cell,
    ReportConfig,
    Run,
    cells,
    compare,
    headline,
    load_runs,
)
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

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    """A cell (one setting and model, all its seeds) as found in one source (its label and its
    own setting name) and as shown in the comparison (``cell.setting`` qualified by the label
    when there are several sources)."""

    label: str
    setting: str
    cell: Cell


def load_source(label: str, models_dir: str, rev: str | None = None, repo: str = ".") -> list[Run]:
    """The runs of ``models_dir`` in the workspace (``rev`` None) or at a git revision or DVC
    experiment name of ``repo`` (files tracked by DVC are read from its cache)."""
    if rev is None:
        runs = load_runs(models_dir)
    else:
        from dvc.api import DVCFileSystem

        runs = load_runs(models_dir, DVCFileSystem(repo, rev=rev))
    if not runs:
        where = models_dir if rev is None else f"{models_dir} at {rev}"
        raise FileNotFoundError(f"{label}: no trained runs (per_user.parquet) under {where}")
    return runs


def _same_results(a: Cell, b: Cell) -> bool:
    """Whether two cells hold the same per-user results run by run (seed order)."""
    return len(a.runs) == len(b.runs) and all(
        x.per_user.equals(y.per_user) for x, y in zip(a.runs, b.runs, strict=True)
    )


def merge(sources: Sequence[tuple[str, list[Run]]]) -> list[Entry]:
    """Every source's cells (its runs grouped by setting and model); with several sources each
    setting is qualified as ``setting (label)``. A cell whose runs' per-user results equal
    those of a cell already taken (DVC did not re-run it for the later experiment) is dropped,
    so it is neither shown nor tested twice."""
    entries: list[Entry] = []
    taken: dict[tuple[str, str], list[Cell]] = {}
    for label, runs in sources:
        for cell in cells(runs):
            same = taken.setdefault((cell.setting, cell.model), [])
            if any(_same_results(other, cell) for other in same):
                continue
            same.append(cell)
            shown = cell.setting if len(sources) == 1 else f"{cell.setting} ({label})"
            qualified = Cell(tuple(replace(r, setting=shown) for r in cell.runs))
            entries.append(Entry(label, cell.setting, qualified))
    return entries


def _same_users(a: Cell, b: Cell) -> bool:
    return a.runs[0].per_user["user_id"].sort().equals(b.runs[0].per_user["user_id"].sort())


def cross_pairs(entries: Sequence[Entry]) -> list[tuple[str, Cell, Cell]]:
    """(label, A, B) pairs of cells, the later source's as A: for each model and stage, cells
    of different encoders ("finetuned: vlmo vs clip"), and the same setting from two sources
    ("clip-finetuned: exp-b vs exp-a"). Pairs tested on different users (another dataset or
    split) cannot be paired and are left out, with a warning."""
    pairs, unpaired = [], []
    for first, second in itertools.combinations(entries, 2):
        if first.cell.model != second.cell.model or first.label == second.label:
            continue
        parts_a, parts_b = encoder_stage(second.setting), encoder_stage(first.setting)
        if second.setting == first.setting:
            label = f"{second.setting}: {second.label} vs {first.label}"
        elif parts_a and parts_b and parts_a[1] == parts_b[1] and parts_a[0] != parts_b[0]:
            label = f"{parts_a[1]}: {parts_a[0]} vs {parts_b[0]}"
        else:
            continue
        if _same_users(second.cell, first.cell):
            pairs.append((label, second.cell, first.cell))
        else:
            unpaired.append(f"{second.cell.name} / {first.cell.name}")
    if unpaired:
        log.warning("not paired (different test users): %s", "; ".join(unpaired))
    return pairs


def setting_order(entries: Sequence[Entry]) -> list[str]:
    """The shown feature settings (ID-only runs are references, not columns) in source order,
    each source's in the paper's column order."""
    rank = {stage: i for i, stage in enumerate((*LMM_STAGES, E2E), 1)}  # the baseline: 0

    def key(entry: Entry) -> tuple[int, int, str]:
        parts = encoder_stage(entry.setting)
        stage = 0 if entry.setting == BASELINE else rank[parts[1]] if parts else 4
        return labels.index(entry.label), stage, entry.setting

    labels = list(dict.fromkeys(e.label for e in entries))
    features = [e for e in entries if e.setting != ID_ONLY]
    return list(dict.fromkeys(e.cell.setting for e in sorted(features, key=key)))


def source_label(spec: str) -> tuple[str, str]:
    """``LABEL=PATH`` -> (LABEL, PATH); a bare PATH is labelled by its parent folder's name."""
    label, sep, path = spec.partition("=")
    if not sep:
        path, label = spec, Path(spec).resolve().parent.name
    if not label or not path:
        raise ValueError(f"--dir {spec!r}: give LABEL=PATH (e.g. clip=models/demo)")
    return label, path


def compare_experiments(
    dataset: str, revs: Sequence[str], dirs: Sequence[str], cfg: ReportConfig, out: Path
) -> dict:
    """Compare the runs of ``dataset`` at each of ``revs`` (git revisions or DVC experiment
    names; "workspace" for the files on disk) and in each ``LABEL=PATH`` of ``dirs``: the
    report's tables, spread and tests across users and seeds, written into ``out``
    (compare.md, compare.html, summary.json). Returns what summary.json holds."""
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
    shown = [e.cell for e in entries]
    rows = compare(cross_pairs(entries), cfg)
    shares = headline(rows)
    settings = setting_order(entries)
    blocks: list = [
        ("h1", f"Comparison on {dataset}: {', '.join(labels)}"),
        ("p", "Tests between encoders at the same stage and between sources for the same "
              "setting (cells whose per-user results are identical in several sources are "
              f"shown once); Holm–Bonferroni across all {len(rows)} tests. {seeds_text(shown)} "
              "Tables: the mean over seeds, with the smallest and largest run in brackets when "
              "there are several; best mean per model in bold. " + method_text(cfg.alpha)),
    ]  # fmt: skip
    note = seed_note(rows)
    if note:
        blocks.append(("p", note))
    for metric in cfg.metrics:
        blocks += [("h2", f"Test {metric}"), ("table", settings_table(shown, {}, settings, metric))]
    blocks += spread_blocks(shown, settings, cfg.metrics)
    blocks += [("h2", "Headline"), ("p", headline_text(shares)), ("h2", "Tests")]
    blocks.append(("table", comparisons_table(rows)) if rows else ("p", "No pairable runs."))
    write_report(blocks, out, "compare", f"lmmrec comparison: {dataset}")
    result = {
        **cell_summary(shown, cfg.metrics),
        "headline": shares,
        "comparisons": outcomes(rows),
        "seed_note": note,
    }
    write_json(out / "summary.json", result)
    log.info("compare: %d cells from %s, %d tests -> %s", len(shown), labels, len(rows), out)
    return result
