"""The significance report as one list of blocks, rendered to Markdown and to self-contained
HTML (plots embedded), plus the JSON summary: the paper's tables (mean over seeds and spread),
the run-to-run spread, its comparisons across users and seeds, the comparisons with the
ID-only references and the computed headline shares."""

from __future__ import annotations

import base64
import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.atomic import atomic_path
from pipeline.features.names import ID_ONLY
from pipeline.report.significance import Cell, ReportConfig, present_settings

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


def _is_reference(cell: Cell) -> bool:
    return cell.setting == ID_ONLY or cell.setting.startswith(f"{ID_ONLY} (")  # "id (<source>)"


def _grid(
    cells: Sequence[Cell], settings: Sequence[str], text: Callable[[Cell], str],
    best: Callable[[Cell], float] | None = None,
) -> Table:  # fmt: skip
    """One row per model, one column per feature setting with a cell (in ``settings``
    order), each cell as ``text`` gives it and the highest ``best`` of a row in bold; then
    one row per ID-only reference in its own column."""
    columns = present_settings(cells, settings)
    by_key = {(c.model, c.setting): c for c in cells if c.setting in columns}
    table = Table(["model", *columns, NO_FEATURES], [])
    for model in sorted({model for model, _ in by_key}):
        row = [by_key.get((model, s)) for s in columns]
        if best is not None:
            top = max(best(c) for c in row if c is not None)
            table.bold |= {
                (len(table.rows), col)
                for col, c in enumerate(row, start=1)
                if c is not None and best(c) == top
            }
        table.rows.append([model, *("" if c is None else text(c) for c in row), ""])
    for cell in filter(_is_reference, cells):
        name = cell.model + cell.setting.removeprefix(ID_ONLY)
        table.rows.append([name, *[""] * len(columns), text(cell)])
    return table


def _mean_spread(cell: Cell, metric: str) -> str:
    """The mean over seeds; with several seeds, the smallest and largest run in brackets."""
    values = cell.values(metric)
    if values.size == 1:
        return _fmt(values[0])
    return f"{_fmt(values.mean())} ({_fmt(values.min())}–{_fmt(values.max())})"


def settings_table(
    cells: Sequence[Cell], baselines: dict[str, dict[str, float]], settings: Sequence[str],
    metric: str,
) -> Table:  # fmt: skip
    """The paper's layout: one row per model, one column per feature setting (those with at
    least one run, in ``settings`` order), each cell the mean over seeds with the min–max
    over seeds when there are several, the best mean of each row in bold; then the ID-only
    runs and the non-learned ``baselines`` in their own column."""
    table = _grid(cells, settings, lambda c: _mean_spread(c, metric), lambda c: c.mean(metric))
    for name, values in baselines.items():
        table.rows.append([name, *[""] * (len(table.header) - 2), _fmt(values[metric])])
    return table


def spread_table(cells: Sequence[Cell], settings: Sequence[str], metric: str) -> Table:
    """The run-to-run spread: per model and setting, the largest minus the smallest test
    ``metric`` over seeds (and how many seeds), laid out as ``settings_table``."""

    def text(cell: Cell) -> str:
        spread = cell.spread(metric)
        if spread is None:
            return "1 seed"
        return f"{_fmt(spread)} ({len(cell.runs)} seeds)"

    return _grid(cells, settings, text)


def _seeds(row: dict) -> str:
    if not row["noise_estimated"]:
        return "1: training noise not separable"
    if row["paired_seeds"]:
        return f"{row['n_seeds_a']}, paired"
    return f"{row['n_seeds_a']} vs {row['n_seeds_b']}"


def comparisons_table(rows: Sequence[dict]) -> Table:
    """Tests across users and seeds: difference with its CI, effect size, t and its df, raw
    and Holm p-values, Wilcoxon p, the seeds, the smallest and largest per-seed difference,
    whether every seed agrees in sign, and whether the difference holds."""
    header = ["comparison", "A", "B", "metric", "mean A", "mean B", "A−B [95% CI]", "d_z", "t"]
    header += ["df", "p", "p (Holm)", "Wilcoxon p (users)", "significant", "seeds"]
    table = Table([*header, "per-seed A−B (min … max)", "same sign", "holds"], [])
    yes = {True: "yes", False: "no"}
    for r in rows:
        ci = f"{r['diff']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]"
        table.rows.append(
            [r["comparison"], r["a"], r["b"], r["metric"], _fmt(r["mean_a"]), _fmt(r["mean_b"]),
             ci, f"{r['effect_size_dz']:.3f}", f"{r['t']:.3f}", f"{r['df']:.1f}", _p(r["p"]),
             _p(r["p_holm"]), _p(r["wilcoxon_p"]), yes[r["significant"]], _seeds(r),
             f"{r['diff_min']:+.4f} … {r['diff_max']:+.4f}", yes[r["same_sign"]],
             yes[r["holds"]]]
        )  # fmt: skip
        if r["holds"]:
            table.bold.add((len(table.rows) - 1, len(table.header) - 1))
    return table


def headline_text(headline: dict[str, dict[str, float]]) -> str:
    """One sentence per comparison, from ``significance.headline``: only differences that
    hold count."""
    if not headline:
        return "No pair of settings to compare yet."
    sentences = []
    for label, h in headline.items():
        text = (
            f"**{label}**: the first better in {h['better']} of {h['cases']} cases "
            f"({h['share_better']:.0%}), worse in {h['worse']}"
        )
        if h["flips"]:
            text += f"; {h['flips']} more significant but of another sign in some seed"
        if h["one_seed"]:
            text += f"; {h['one_seed']} of the {h['cases']} rest on one training run per side"
        sentences.append(text + ".")
    return "Counting only differences that hold (significant after Holm and of the same sign " \
        "in every seed): " + " ".join(sentences)  # fmt: skip


def seed_note(rows: Sequence[dict]) -> str:
    """What the seeds allow the comparisons to claim, in plain words; empty with no tests."""
    single = sum(not r["noise_estimated"] for r in rows)
    if not rows or not single:
        return ""
    if single == len(rows):
        return (
            "**One training run per model and setting: this report cannot separate training "
            "noise from the effect.** Its tests count the users only; a difference they call "
            "significant may be the noise of one training run (a second run of the same "
            "params has moved a model's test recall@20 by 12%). Train several seeds to test "
            "across them."
        )
    return (
        f"**{single} of the {len(rows)} tests rest on one training run per side** (seeds "
        "column: 1): for those the test cannot separate training noise from the effect; it "
        "counts the users only."
    )


_METHOD = (
    "How the comparisons are tested: D = mean(A) − mean(B) over test users and seeds, with "
    "se² = var_users(d_u)/n + var_seeds(D_s)/k, where d_u is user u's difference averaged over "
    "the seeds, n the users, D_s seed s's mean difference and k the seeds; t = D / se with "
    "Welch–Satterthwaite degrees of freedom (n − 1 for the users' part, k − 1 for the seeds'). "
    "Runs pair seed with seed when A and B have the same seeds (a seed fixes initialisation and "
    "sampling in both); otherwise the seeds' part is var(A's seed means)/k_A + var(B's)/k_B, a "
    "side with a single run taking the other side's variance. Why: a paired test over users "
    "alone treats each trained model as fixed, while a model's test figure moves with its "
    "training run; a test over the per-seed means alone ignores that the test users are a "
    "sample. The user-by-seed noise is counted in both parts, which errs on the safe side; a "
    "few seeds give few degrees of freedom and wide intervals, as they should; with one run "
    "per side the test is the paired t-test over users. A difference **holds** when it is "
    "significant at α = {alpha} after Holm–Bonferroni within its family and of the same sign "
    "in every seed (seed with seed, or every run of A against every run of B when the seeds "
    "differ); the headline counts only those. Effect size d_z: D over the standard deviation "
    "of d_u; the Wilcoxon signed-rank test of d_u is a robustness check over users."
)


def method_text(alpha: float) -> str:
    """The test, its reason and what "holds" means, for the reports' opening paragraph."""
    return _METHOD.format(alpha=alpha)


def seeds_text(cells: Sequence[Cell]) -> str:
    """Which seeds the cells were trained with, and how many cells each."""
    counts: dict[tuple, int] = {}
    for cell in cells:
        counts[tuple(cell.seeds)] = counts.get(tuple(cell.seeds), 0) + 1
    parts = []
    for seeds, count in counts.items():
        named = ", ".join("unnamed (saved before seeds)" if s is None else str(s) for s in seeds)
        parts.append(f"{named} ({count} model × setting cells)")
    return "Seeds: " + "; ".join(parts) + "."


def spread_blocks(
    cells: Sequence[Cell], settings: Sequence[str], metrics: Sequence[str]
) -> list[Block]:
    """The run-to-run spread section: what it is, and one table per metric."""
    blocks: list[Block] = [
        ("h2", "Run-to-run spread"),
        ("p", "Per model and setting, the largest minus the smallest test figure over its "
              "seeds: how far a training run alone moves the result. A difference between "
              "settings smaller than this is not one to trust from a single run."),
    ]  # fmt: skip
    for metric in metrics:
        blocks += [("h3", f"Test {metric}"), ("table", spread_table(cells, settings, metric))]
    return blocks


def report_blocks(
    dataset: str,
    cells: Sequence[Cell],
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
    n_users = cells[0].runs[0].per_user.height if cells else 0
    opening = (
        f"Test users: {n_users}. {seeds_text(cells)} Tables: the mean over seeds, with the "
        "smallest and largest run in brackets when there are several; best mean per model in "
        "bold. " + method_text(cfg.alpha)
    )

    def tables(metrics: Sequence[str]) -> list[Block]:
        return [
            block
            for metric in metrics
            for block in (
                ("h3", f"Test {metric}"),
                ("table", settings_table(cells, baselines, settings, metric)),
            )
        ]

    blocks: list[Block] = [("h1", f"Significance report: {dataset}"), ("p", opening)]
    note = seed_note([*paper_rows, *reference_rows])
    if note:
        blocks.append(("p", note))
    blocks.append(("h2", "The paper's table"))
    blocks += tables(cfg.metrics)
    blocks += spread_blocks(cells, settings, cfg.metrics)
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
    """Each test's labels, difference with CI, effect size, p-values, seeds, per-seed
    differences and verdicts (significant; holds: significant and one sign in every seed)."""
    keys = ("comparison", "a", "b", "metric", "diff", "ci_low", "ci_high", "effect_size_dz")
    keys += ("df", "p", "p_holm", "wilcoxon_p", "significant", "seeds_a", "seeds_b")
    keys += ("paired_seeds", "noise_estimated", "seed_diffs", "seed_p", "diff_min", "diff_max")
    return [{k: r[k] for k in (*keys, "same_sign", "holds")} for r in rows]


def _mean_metrics(cell: Cell) -> dict[str, float]:
    """Each metric every run of ``cell`` has, averaged over its seeds."""
    shared = set.intersection(*(set(r.metrics) for r in cell.runs))
    return {k: cell.mean(k) for k in sorted(shared)}


def cell_summary(cells: Sequence[Cell], metrics: Sequence[str]) -> dict:
    """Per ``setting/model``: the metrics averaged over seeds (``runs``), the seeds, each
    seed's metrics, and per metric the run-to-run spread (None with one seed)."""
    key = {id(c): f"{c.setting}/{c.model}" for c in cells}
    return {
        "runs": {key[id(c)]: _mean_metrics(c) for c in cells},
        "seeds": {key[id(c)]: c.seeds for c in cells},
        "runs_per_seed": {
            key[id(c)]: [{"seed": r.seed, "metrics": dict(r.metrics)} for r in c.runs]
            for c in cells
        },
        "spread": {m: {key[id(c)]: c.spread(m) for c in cells} for m in metrics},
    }


def summary(
    cells: Sequence[Cell],
    baselines: dict[str, dict[str, float]],
    paper_rows: Sequence[dict],
    reference_rows: Sequence[dict],
    headline: dict[str, dict[str, float]],
    metrics: Sequence[str],
) -> dict:
    """Machine-readable summary (a DVC metric): ``cell_summary``, the baselines, the headline
    shares (differences that hold), every test's outcome and the one-seed note."""
    return {
        **cell_summary(cells, metrics),
        "baselines": baselines,
        "headline": headline,
        "paper_comparisons": outcomes(paper_rows),
        "reference_comparisons": outcomes(reference_rows),
        "seed_note": seed_note([*paper_rows, *reference_rows]),
    }
