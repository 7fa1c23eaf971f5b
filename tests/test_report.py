"""The significance report: the paper's comparisons, its tables and its HTML page."""

import re

import numpy as np
import polars as pl
import pytest
from scipy import stats

from pipeline.report import report_blocks, settings_table, summary, to_html, to_markdown
from pipeline.report_plots import bar_plot
from pipeline.significance import (
    ReportConfig,
    Run,
    compare,
    encoder_settings,
    headline,
    holm,
    paper_pairs,
)

CFG = ReportConfig(alpha=0.05, metrics=("recall@20",))
N_USERS = 500


def _run(setting: str, model: str, recall: np.ndarray) -> Run:
    per_user = pl.DataFrame(
        {"user_id": np.arange(len(recall), dtype=np.int32), "recall@20": recall}
    )
    return Run(setting, model, {"recall@20": float(recall.mean())}, per_user)


@pytest.fixture()
def runs() -> list[Run]:
    """Model ``effect``: pretrained CLIP clearly above cnn_st; model ``null``: no difference;
    both trained on the fine-tuned set too; plus an ID-only BPR."""
    rng = np.random.default_rng(7)
    base = rng.random(N_USERS)
    noise = lambda: rng.normal(0, 0.05, N_USERS)  # noqa: E731
    return [
        _run("cnn_st", "effect", base),
        _run("clip-pretrained", "effect", base + 0.1 + noise()),
        _run("clip-finetuned", "effect", base + 0.1 + noise()),
        _run("cnn_st", "null", base),
        _run("clip-pretrained", "null", base + noise()),
        _run("clip-finetuned", "null", base + noise()),
        _run("id", "bpr", base - 0.05 + noise()),
    ]


def _paper_rows(runs: list[Run]) -> list[dict]:
    return compare(paper_pairs(runs, "clip"), CFG)


def test_paper_family_flags_the_known_effect_not_the_null_with_holm(runs):
    rows = _paper_rows(runs)
    by = {(r["comparison"], r["a"]): r for r in rows}
    effect = by["pretrained LMM vs cnn_st", "effect [clip-pretrained]"]
    null = by["pretrained LMM vs cnn_st", "null [clip-pretrained]"]
    assert effect["significant"] and effect["diff"] > 0
    assert not null["significant"]
    # the correction is Holm's over the whole family of the paper's comparisons
    assert [r["p_holm"] for r in rows] == pytest.approx(holm([r["p"] for r in rows]))
    assert all(r["p_holm"] >= r["p"] for r in rows)
    # the e2e comparisons have no e2e runs yet, so they are absent rather than invented
    assert {r["comparison"] for r in rows} == {
        "pretrained LMM vs cnn_st",
        "fine-tuned vs pretrained",
    }


def test_a_null_that_is_nominally_significant_is_not_after_correction():
    """Twenty null comparisons with one p just under alpha: Holm must not flag it."""
    rng = np.random.default_rng(3)
    base = rng.random(N_USERS)
    runs = [_run("cnn_st", f"m{i}", base) for i in range(20)]
    for i in range(20):
        runs.append(_run("clip-pretrained", f"m{i}", base + rng.normal(0, 0.05, N_USERS)))
    rows = _paper_rows(runs)
    assert len(rows) == 20
    smallest = min(rows, key=lambda r: r["p"])
    assert smallest["p"] < CFG.alpha  # nominally significant by chance (this seed)...
    assert not any(r["significant"] for r in rows)  # ...but not after Holm
    assert smallest["p_holm"] == pytest.approx(min(1.0, 20 * smallest["p"]))


def test_p_values_match_scipy_ttest_rel_on_the_per_user_columns(runs):
    by_name = {r.name: r for r in runs}
    for row in _paper_rows(runs):
        a = by_name[row["a"]].per_user["recall@20"].to_numpy()
        b = by_name[row["b"]].per_user["recall@20"].to_numpy()
        assert row["p"] == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-12)


def test_headline_counts_significant_wins_and_losses(runs):
    shares = headline(_paper_rows(runs))
    assert shares["pretrained LMM vs cnn_st"] == {
        "cases": 2, "better": 1, "worse": 0, "share_better": 0.5
    }  # fmt: skip


def _cell_values(markdown: str, metric: str) -> dict[tuple[str, str], float]:
    """(model, column) -> value of the paper table for ``metric`` in the Markdown report."""
    section = markdown.split(f"### Test {metric}\n\n", 1)[1].split("\n\n", 1)[0]
    lines = section.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    values = {}
    for line in lines[2:]:
        cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
        for column, cell in zip(header[1:], cells[1:], strict=True):
            if cell:
                values[cells[0], column] = float(cell)
    return values


def test_report_tables_equal_the_runs_metrics_and_best_is_bold(runs, tmp_path):
    baselines = {"most_popular": {"recall@20": 0.0123}}
    settings = encoder_settings("clip")
    bar_plot(runs, settings, "recall@20", tmp_path / "plots/bars.png")
    paper = _paper_rows(runs)
    blocks = report_blocks(
        "demo", runs, baselines, settings, paper, [], headline(paper), CFG, ["recall@20"],
        [("plots/bars.png", "bars")],
    )  # fmt: skip
    markdown = to_markdown(blocks)
    values = _cell_values(markdown, "recall@20")
    for run in runs:
        column = "ID only / none" if run.setting == "id" else run.setting
        assert values[run.model, column] == pytest.approx(run.metrics["recall@20"], abs=5e-5)
    assert values["most_popular", "ID only / none"] == pytest.approx(0.0123)
    table = settings_table(runs, baselines, settings, "recall@20")
    effect_row = [row[0] for row in table.rows].index("effect")
    best = max(range(1, 4), key=lambda col: float(table.rows[effect_row][col]))
    assert (effect_row, best) in table.bold
    assert "e2e-clip" not in table.header  # no e2e run: no empty column

    page = to_html(blocks, tmp_path, "report")
    assert "data:image/png;base64," in page
    assert not re.search(r"(src|href)=['\"](?!data:)", page)  # self-contained
    result = summary(runs, baselines, paper, [], headline(paper))
    assert result["runs"]["clip-pretrained/effect"] == runs[1].metrics
    assert len(result["paper_comparisons"]) == len(paper)
