"""The significance report: the paper's comparisons across seeds, its tables, the run-to-run
spread and its HTML page."""

import json
import re

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from scipy import stats
from tables import interactions_table

from pipeline.features.names import encoder_settings
from pipeline.report.plots import bar_plot
from pipeline.report.significance import (
    Cell,
    ReportConfig,
    Run,
    cells,
    compare,
    headline,
    holm,
    paper_pairs,
)
from pipeline.report.tables import (
    report_blocks,
    seed_note,
    settings_table,
    spread_table,
    summary,
    to_html,
    to_markdown,
)
from stages import report

CFG = ReportConfig(alpha=0.05, metrics=("recall@20",))
N_USERS = 500
SEEDS = (2022, 2023)


def _run(setting: str, model: str, recall: np.ndarray, seed: int | None = None) -> Run:
    per_user = pl.DataFrame(
        {"user_id": np.arange(len(recall), dtype=np.int32), "recall@20": recall}
    )
    return Run(setting, model, {"recall@20": float(recall.mean())}, per_user, seed=seed)


@pytest.fixture()
def runs() -> list[Run]:
    """Model ``effect``: pretrained CLIP clearly above cnn_st in both seeds; model ``null``: no
    difference; both trained on the fine-tuned set too, and ``effect`` end to end with a single
    seed; plus an ID-only BPR. Each seed moves a run by a little training noise."""
    rng = np.random.default_rng(7)
    base = rng.random(N_USERS)

    def seeded(setting: str, model: str, shift: float, seeds=SEEDS) -> list[Run]:
        return [
            _run(
                setting,
                model,
                base + shift + rng.normal(0, 0.005) + rng.normal(0, 0.05, N_USERS),
                s,
            )
            for s in seeds
        ]

    return [
        *seeded("cnn_st", "effect", 0.0),
        *seeded("clip-pretrained", "effect", 0.1),
        *seeded("clip-finetuned", "effect", 0.1),
        *seeded("e2e-clip", "effect", 0.1, seeds=(2022,)),
        *seeded("cnn_st", "null", 0.0),
        *seeded("clip-pretrained", "null", 0.0),
        *seeded("clip-finetuned", "null", 0.0),
        *seeded("id", "bpr", -0.05),
    ]


def _paper_rows(grouped: list[Cell]) -> list[dict]:
    return compare(paper_pairs(grouped, "clip"), CFG)


def test_paper_family_flags_the_known_effect_not_the_null_with_holm(runs):
    rows = _paper_rows(cells(runs))
    by = {(r["comparison"], r["a"]): r for r in rows}
    effect = by["pretrained LMM vs cnn_st", "effect [clip-pretrained]"]
    null = by["pretrained LMM vs cnn_st", "null [clip-pretrained]"]
    assert effect["significant"] and effect["holds"] and effect["diff"] > 0
    assert effect["paired_seeds"] and effect["seeds_a"] == [2022, 2023]
    assert not null["significant"] and not null["holds"]
    # the correction is Holm's over the whole family of the paper's comparisons
    assert [r["p_holm"] for r in rows] == pytest.approx(holm([r["p"] for r in rows]))
    assert all(r["p_holm"] >= r["p"] for r in rows)
    # e2e has one seed against two: not paired by seed, every run against every run
    e2e = by["end-to-end vs pretrained", "effect [e2e-clip]"]
    assert not e2e["paired_seeds"] and len(e2e["seed_diffs"]) == 2 and e2e["noise_estimated"]
    assert {r["comparison"] for r in rows} == {
        "pretrained LMM vs cnn_st", "fine-tuned vs pretrained", "end-to-end vs fine-tuned",
        "end-to-end vs pretrained",
    }  # fmt: skip


def test_a_null_that_is_nominally_significant_is_not_after_correction():
    """Twenty null comparisons with one p just under alpha: Holm must not flag it."""
    rng = np.random.default_rng(3)
    base = rng.random(N_USERS)
    runs = [_run("cnn_st", f"m{i}", base) for i in range(20)]
    for i in range(20):
        runs.append(_run("clip-pretrained", f"m{i}", base + rng.normal(0, 0.05, N_USERS)))
    rows = _paper_rows(cells(runs))
    assert len(rows) == 20
    smallest = min(rows, key=lambda r: r["p"])
    assert smallest["p"] < CFG.alpha  # nominally significant by chance (this seed)...
    assert not any(r["significant"] for r in rows)  # ...but not after Holm
    assert smallest["p_holm"] == pytest.approx(min(1.0, 20 * smallest["p"]))


def test_one_seed_p_values_match_scipy_ttest_rel_on_the_per_user_columns(runs):
    one = [r for r in runs if r.seed == 2022]
    by_name = {r.name: r for r in one}
    for row in _paper_rows(cells(one)):
        a = by_name[row["a"]].per_user["recall@20"].to_numpy()
        b = by_name[row["b"]].per_user["recall@20"].to_numpy()
        assert row["p"] == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-9)


def test_headline_counts_differences_that_hold(runs):
    shares = headline(_paper_rows(cells(runs)))
    assert shares["pretrained LMM vs cnn_st"] == {
        "cases": 2, "better": 1, "worse": 0, "flips": 0, "one_seed": 0, "share_better": 0.5
    }  # fmt: skip


def _cell_texts(markdown: str, section: str, metric: str) -> dict[tuple[str, str], str]:
    """(model, column) -> text of the table for ``metric`` under the h2 ``section``."""
    part = markdown.split(f"## {section}\n\n", 1)[1]
    table = part.split(f"### Test {metric}\n\n", 1)[1].split("\n\n", 1)[0]
    lines = table.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    texts = {}
    for line in lines[2:]:
        cells_ = [c.strip().strip("*") for c in line.strip("|").split("|")]
        for column, cell in zip(header[1:], cells_[1:], strict=True):
            if cell:
                texts[cells_[0], column] = cell
    return texts


def test_tables_show_mean_and_range_over_seeds_and_best_mean_is_bold(runs, tmp_path):
    baselines = {"most_popular": {"recall@20": 0.0123}}
    settings = encoder_settings("clip")
    grouped = cells(runs)
    bar_plot(grouped, settings, "recall@20", tmp_path / "plots/bars.png")
    paper = _paper_rows(grouped)
    blocks = report_blocks(
        "demo", grouped, baselines, settings, paper, [], headline(paper), CFG, ["recall@20"],
        [("plots/bars.png", "bars")],
    )  # fmt: skip
    markdown = to_markdown(blocks)
    texts = _cell_texts(markdown, "The paper's table", "recall@20")
    for cell in grouped:
        column = "ID only / none" if cell.setting == "id" else cell.setting
        values = cell.values("recall@20")
        numbers = [float(x) for x in re.findall(r"\d\.\d{4}", texts[cell.model, column])]
        if len(cell.runs) == 1:  # one seed: the value alone
            assert numbers == pytest.approx([values[0]], abs=5e-5)
        else:  # mean (min–max)
            assert numbers == pytest.approx([values.mean(), values.min(), values.max()], abs=5e-5)
    assert texts["most_popular", "ID only / none"] == "0.0123"
    table = settings_table(grouped, baselines, settings, "recall@20")
    effect_row = [row[0] for row in table.rows].index("effect")
    effect = {c.setting: c.mean("recall@20") for c in grouped if c.model == "effect"}
    means = {col: effect[setting] for col, setting in enumerate(table.header) if setting in effect}
    assert (effect_row, max(means, key=means.get)) in table.bold
    assert len([b for b in table.bold if b[0] == effect_row]) == 1

    page = to_html(blocks, tmp_path, "report")
    assert "data:image/png;base64," in page
    assert not re.search(r"(src|href)=['\"](?!data:)", page)  # self-contained
    result = summary(grouped, baselines, paper, [], headline(paper), CFG.metrics)
    pretrained = next(c for c in grouped if c.name == "effect [clip-pretrained]")
    assert result["runs"]["clip-pretrained/effect"]["recall@20"] == pytest.approx(
        pretrained.mean("recall@20")
    )
    assert result["seeds"]["clip-pretrained/effect"] == [2022, 2023]
    assert result["seeds"]["e2e-clip/effect"] == [2022]
    assert [r["seed"] for r in result["runs_per_seed"]["clip-pretrained/effect"]] == [2022, 2023]
    assert len(result["paper_comparisons"]) == len(paper)
    assert {"same_sign", "holds", "seed_diffs", "diff_min", "diff_max", "df"} <= set(
        result["paper_comparisons"][0]
    )
    assert result["seed_note"] == ""  # every comparison estimated training noise


def test_run_to_run_spread_in_the_report_and_summary(runs):
    grouped = cells(runs)
    settings = encoder_settings("clip")
    table = spread_table(grouped, settings, "recall@20")
    row = table.rows[[r[0] for r in table.rows].index("effect")]
    pretrained = next(c for c in grouped if c.name == "effect [clip-pretrained]")
    values = pretrained.values("recall@20")
    assert row[table.header.index("clip-pretrained")] == (
        f"{values.max() - values.min():.4f} (2 seeds)"
    )
    assert row[table.header.index("e2e-clip")] == "1 seed"
    assert table.rows[-1][0] == "bpr" and table.rows[-1][-1].endswith("(2 seeds)")
    spread = summary(grouped, {}, [], [], {}, CFG.metrics)["spread"]["recall@20"]
    assert spread["clip-pretrained/effect"] == pytest.approx(values.max() - values.min())
    assert spread["e2e-clip/effect"] is None
    markdown = to_markdown(report_blocks("demo", grouped, {}, settings, [], [], {}, CFG, [], []))
    assert "## Run-to-run spread" in markdown


def test_one_seed_says_it_cannot_separate_training_noise(runs):
    one = cells([r for r in runs if r.seed in (None, 2022)])
    rows = _paper_rows(one)
    assert not any(r["noise_estimated"] for r in rows)
    note = seed_note(rows)
    assert "cannot separate training noise from the effect" in note
    markdown = to_markdown(
        report_blocks("demo", one, {}, encoder_settings("clip"), rows, [], headline(rows), CFG,
                      [], [])
    )  # fmt: skip
    assert note in markdown
    assert "1: training noise not separable" in markdown  # the per-comparison column
    # with seeds for most comparisons, the note counts those that rest on one run per side
    by_name = {c.name: c for c in one}
    single = ("single", by_name["effect [clip-pretrained]"], by_name["effect [cnn_st]"])
    partial = _paper_rows(cells(runs)) + compare([single], CFG)
    assert seed_note(partial).startswith(f"**1 of the {len(partial)} tests rest on one")
    assert seed_note(_paper_rows(cells(runs))) == ""


def test_report_stage_reads_seed_folders_beside_the_old_layout(tmp_path):
    """The report stage on ``models/<setting>/<model>/seed-<n>/`` folders (two seeds, e2e
    one) and an ID-only run in the layout before seeds: tables, spread, tests and curves."""
    n_users, n_items = 60, 20
    users = [u for u in range(n_users) for _ in range(4)]
    items = [(u + k) % n_items for u in range(n_users) for k in range(4)]
    splits = ["train", "train", "valid", "test"] * n_users
    pq.write_table(interactions_table(users, items, splits), tmp_path / "interactions.parquet")
    rng = np.random.default_rng(0)
    base = rng.random(n_users)

    def write(folder, shift: float) -> None:
        recall = np.clip(base + shift + rng.normal(0, 0.05, n_users), 0, 1)
        folder.mkdir(parents=True)
        pl.DataFrame(
            {"user_id": np.arange(n_users, dtype=np.int32), "recall@20": recall,
             "ndcg@20": recall / 2}
        ).write_parquet(folder / "per_user.parquet")  # fmt: skip
        metrics = {"recall@20": float(recall.mean()), "ndcg@20": float(recall.mean() / 2)}
        (folder / "metrics.json").write_text(json.dumps(metrics))
        curve = folder / "dvclive/plots/metrics/valid_recall@20.tsv"
        curve.parent.mkdir(parents=True)
        curve.write_text("step\tvalid_recall@20\n0\t0.1\n1\t0.2\n")

    models = tmp_path / "models"
    for seed in (2022, 2023):
        write(models / f"cnn_st/vbpr/seed-{seed}", 0.0)
        write(models / f"clip-pretrained/vbpr/seed-{seed}", 0.2)
    write(models / "e2e-clip/vbpr/seed-2022", 0.2)
    write(models / "id/bpr", -0.1)  # saved before seeds were an axis
    params = {"dataset": "t", "encoder": "clip", "seed": 2022, "eval": {"topk": [20]},
              "report": {"alpha": 0.05, "metrics": ["recall@20"]}}  # fmt: skip
    out = tmp_path / "reports"
    result = report.run(params, tmp_path / "interactions.parquet", models, out)
    assert result["seeds"] == {
        "clip-pretrained/vbpr": [2022, 2023], "cnn_st/vbpr": [2022, 2023],
        "e2e-clip/vbpr": [2022], "id/bpr": [None],
    }  # fmt: skip
    assert result["spread"]["recall@20"]["id/bpr"] is None
    assert result["spread"]["recall@20"]["cnn_st/vbpr"] > 0
    (pretrained,) = [r for r in result["paper_comparisons"]
                     if r["comparison"] == "pretrained LMM vs cnn_st"]  # fmt: skip
    assert pretrained["paired_seeds"] and pretrained["seed_diffs"] and pretrained["same_sign"]
    vs_bpr = [r for r in result["reference_comparisons"] if r["a"] == "vbpr [cnn_st]"]
    assert vs_bpr and not vs_bpr[0]["paired_seeds"] and vs_bpr[0]["noise_estimated"]
    markdown = (out / "significance.md").read_text()
    assert "## Run-to-run spread" in markdown and "(2 seeds)" in markdown
    assert (out / "plots/valid_curves.png").is_file()
    assert json.loads((out / "summary.json").read_text())["seeds"]["id/bpr"] == [None]
