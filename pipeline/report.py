"""The significance report as one list of blocks, rendered to Markdown and to self-contained
HTML (plots embedded), plus the JSON summary: the paper's tables, its paired comparisons, the
comparisons with the ID-only references and the computed headline shares."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.atomic import atomic_path
from pipeline.schemas import ID_ONLY
from pipeline.significance import ReportConfig, Run, present_settings

NO_FEATURES = "ID only / none"  # the column of the references: BPR, LightGCN, popularity...


@dataclass
class Table:
    """A table of formatted cells; ``bold`` holds the (row, column) cells to emphasise."""

    header: list[str]
    rows: list[list[str]]
    bold: set[tuple[int, int]] = field(default_factory=set)


# A document block: ("h1" | "h2" | "h3" | "p", text), ("table", Table) or ("img", path, alt)
Block = tuple


def _fmt(x: float) -> str:
    return f"{x:.4f}"


def _p(x: float) -> str:
    return f"{x:.2e}" if x < 1e-3 else f"{x:.4f}"


def settings_table(
    runs: Sequence[Run], baselines: dict[str, dict[str, float]], settings: Sequence[str],
    metric: str,
) -> Table:  # fmt: skip
    """The paper's layout: one row per model, one column per feature setting (those with at
    least one run, in ``settings`` order), the best setting of each row in bold; then the
    ID-only runs and the non-learned ``baselines`` in their own column."""
    columns = present_settings(runs, settings)
    value = {(r.model, r.setting): r.metrics[metric] for r in runs if r.setting in columns}
    table = Table(["model", *columns, NO_FEATURES], [])
    for model in sorted({r.model for r in runs if r.setting in columns}):
        cells = [value.get((model, s)) for s in columns]
        best = max(v for v in cells if v is not None)
        for col, v in enumerate(cells, start=1):
            if v == best:
                table.bold.add((len(table.rows), col))
        table.rows.append([model, *("" if v is None else _fmt(v) for v in cells), ""])
    references = {
        r.model + r.setting.removeprefix(ID_ONLY): r.metrics[metric]
        for r in runs
        if r.setting == ID_ONLY or r.setting.startswith(f"{ID_ONLY} (")  # "id (<source>)"
    }
    references.update({name: vals[metric] for name, vals in baselines.items()})
    for name, v in references.items():
        table.rows.append([name, *[""] * len(columns), _fmt(v)])
    return table


def comparisons_table(rows: Sequence[dict]) -> Table:
    """Paired tests: difference with its CI, effect size, raw and Holm p-values, Wilcoxon p."""
    header = ["comparison", "A", "B", "metric", "mean A", "mean B", "A−B [95% CI]", "d_z", "t"]
    table = Table([*header, "p", "p (Holm)", "Wilcoxon p", "significant"], [])
    for r in rows:
        ci = f"{r['diff']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]"
        table.rows.append(
            [r["comparison"], r["a"], r["b"], r["metric"], _fmt(r["mean_a"]), _fmt(r["mean_b"]),
             ci, f"{r['effect_size_dz']:.3f}", f"{r['t']:.3f}", _p(r["p"]), _p(r["p_holm"]),
             _p(r["wilcoxon_p"]), "yes" if r["significant"] else "no"]
        )  # fmt: skip
        if r["significant"]:
            table.bold.add((len(table.rows) - 1, len(table.header) - 1))
    return table


def headline_text(headline: dict[str, dict[str, float]]) -> str:
    """One sentence per comparison, from ``significance.headline``."""
    if not headline:
        return "No pair of settings to compare yet."
    return " ".join(
        f"**{label}**: the first significantly better in {h['better']} of {h['cases']} cases "
        f"({h['share_better']:.0%}), significantly worse in {h['worse']}."
        for label, h in headline.items()
    )


def report_blocks(
    dataset: str,
    runs: Sequence[Run],
    baselines: dict[str, dict[str, float]],
    settings: Sequence[str],
    paper_rows: Sequence[dict],
    reference_rows: Sequence[dict],
    headline: dict[str, dict[str, float]],
    cfg: ReportConfig,
    full_metrics: Sequence[str],
    plots: Sequence[tuple[str, str]],
) -> list[Block]:
    """The whole report; ``plots`` are (path relative to the report, caption)."""
    n_users = runs[0].per_user.height if runs else 0
    method = (
        f"Test users: {n_users}. Paired two-sided t-tests over test users, effect size d_z "
        "(mean difference over its standard deviation) and the 95% CI of the mean difference; "
        f"Holm–Bonferroni correction within each family of tests; significant at α = "
        f"{cfg.alpha} after correction. The Wilcoxon signed-rank test is shown as a "
        "robustness check. Best setting per model in bold."
    )

    def tables(metrics: Sequence[str]) -> list[Block]:
        return [
            block
            for metric in metrics
            for block in (
                ("h3", f"Test {metric}"),
                ("table", settings_table(runs, baselines, settings, metric)),
            )
        ]

    blocks: list[Block] = [("h1", f"Significance report: {dataset}"), ("p", method)]
    blocks.append(("h2", "The paper's table"))
    blocks += tables(cfg.metrics)
    blocks += [("h2", "Headline"), ("p", headline_text(headline))]
    blocks += [
        ("h2", f"The paper's comparisons ({len(paper_rows)} tests, one Holm family)"),
        ("table", comparisons_table(paper_rows)) if paper_rows else ("p", "Nothing to compare."),
        ("h2", f"Against the ID-only references ({len(reference_rows)} tests, one Holm family)"),
        ("table", comparisons_table(reference_rows))
        if reference_rows
        else ("p", "No ID-only reference was trained."),
        ("h2", "Plots"),
    ]
    blocks += [("img", path, caption) for path, caption in plots]
    blocks.append(("h2", "Full table"))
    blocks += tables(full_metrics)
    return blocks


def _md_cell(table: Table, row: int, col: int, text: str) -> str:
    return f"**{text}**" if (row, col) in table.bold and text else text


def to_markdown(blocks: Sequence[Block]) -> str:
    """Markdown with images linked by their relative paths."""
    out = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + rest[0])
        elif kind == "p":
            out.append(rest[0])
        elif kind == "img":
            out.append(f"![{rest[1]}]({rest[0]})")
        else:
            t: Table = rest[0]
            lines = ["| " + " | ".join(t.header) + " |", "|" + "---|" * len(t.header)]
            for i, row in enumerate(t.rows):
                cells = (_md_cell(t, i, j, c) for j, c in enumerate(row))
                lines.append("| " + " | ".join(cells) + " |")
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


_STYLE = (
    "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse;margin:1em 0;font-size:90%}"
    "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
    "td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%}"
)


def _inline(text: str) -> str:
    """HTML-escape, turning **x** into <b>x</b>."""
    parts = html.escape(text).split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def to_html(blocks: Sequence[Block], root: Path, title: str) -> str:
    """One self-contained HTML page: images from ``root`` embedded as base64 PNG."""
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
           f"</title><style>{_STYLE}</style></head><body>"]  # fmt: skip
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{html.escape(rest[0])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{_inline(rest[0])}</p>")
        elif kind == "img":
            data = base64.b64encode((root / rest[0]).read_bytes()).decode()
            alt = html.escape(rest[1])
            out.append(f"<figure><img src='data:image/png;base64,{data}' alt='{alt}'>"
                       f"<figcaption>{alt}</figcaption></figure>")  # fmt: skip
        else:
            t: Table = rest[0]
            head = "".join(f"<th>{html.escape(h)}</th>" for h in t.header)
            body = []
            for i, row in enumerate(t.rows):
                cells = (
                    f"<td><b>{html.escape(c)}</b></td>" if (i, j) in t.bold and c
                    else f"<td>{html.escape(c)}</td>"
                    for j, c in enumerate(row)
                )  # fmt: skip
                body.append("<tr>" + "".join(cells) + "</tr>")
            out.append(f"<table><tr>{head}</tr>{''.join(body)}</table>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_report(blocks: Sequence[Block], out: Path, stem: str, title: str) -> None:
    """``<stem>.md`` and the self-contained ``<stem>.html`` in ``out``, each written
    atomically (images are read from ``out`` by their relative paths)."""
    with atomic_path(out / f"{stem}.md") as tmp:
        tmp.write_text(to_markdown(blocks))
    with atomic_path(out / f"{stem}.html") as tmp:
        tmp.write_text(to_html(blocks, out, title))


def outcomes(rows: Sequence[dict]) -> list[dict]:
    """Each test's labels, difference with CI, effect size, p-values and verdict."""
    keys = ("comparison", "a", "b", "metric", "diff", "ci_low", "ci_high", "effect_size_dz")
    return [{k: r[k] for k in (*keys, "p", "p_holm", "wilcoxon_p", "significant")} for r in rows]


def summary(
    runs: Sequence[Run],
    baselines: dict[str, dict[str, float]],
    paper_rows: Sequence[dict],
    reference_rows: Sequence[dict],
    headline: dict[str, dict[str, float]],
) -> dict:
    """Machine-readable summary (a DVC metric): test metrics per run, the headline shares and
    every test's outcome."""
    return {
        "runs": {f"{r.setting}/{r.model}": dict(r.metrics) for r in runs},
        "baselines": baselines,
        "headline": headline,
        "paper_comparisons": outcomes(paper_rows),
        "reference_comparisons": outcomes(reference_rows),
    }
