import json
import logging
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from scipy import stats

from pipeline.report.significance import (
    Cell,
    ReportConfig,
    Run,
    cells,
    compare,
    headline,
    holm,
    load_runs,
    seeded_test,
)

CFG = ReportConfig(alpha=0.05, metrics=("recall@20",))
N_USERS = 500


def _run(
    model: str, values: dict[str, np.ndarray], users: np.ndarray | None = None,
    seed: int | None = None, setting: str = "feat",
) -> Run:  # fmt: skip
    n = len(next(iter(values.values())))
    users = np.arange(n, dtype=np.int32) if users is None else users
    per_user = pl.DataFrame({"user_id": users, **values})
    metrics = {k: float(v.mean()) for k, v in values.items()}
    return Run(setting, model, metrics, per_user, seed=seed)


def _cell(model: str, recalls: list[np.ndarray], seeds: list[int] | None = None) -> Cell:
    """One cell of ``model`` with a run per recall array, seeded 1, 2, ... unless given."""
    seeds = seeds or list(range(1, len(recalls) + 1))
    pairs = zip(recalls, seeds, strict=True)
    return Cell(tuple(_run(model, {"recall@20": r}, seed=s) for r, s in pairs))


def test_one_seed_is_the_paired_t_test_over_users():
    rng = np.random.default_rng(0)
    a = rng.random(200)
    b = a - 0.05 + rng.normal(0, 0.1, 200)
    res = seeded_test(a[None], b[None], paired=True)
    ref = stats.ttest_rel(a, b)
    assert res["p"] == pytest.approx(ref.pvalue)
    assert res["t"] == pytest.approx(ref.statistic)
    assert res["df"] == 199
    assert res["ci_low"] < res["diff"] < res["ci_high"]
    assert res["diff"] == pytest.approx((a - b).mean())
    assert res["wilcoxon_p"] == pytest.approx(stats.wilcoxon(a, b).pvalue)
    assert not res["noise_estimated"] and res["same_sign"]
    assert res["seed_p"] == pytest.approx([ref.pvalue])


def test_identical_samples_give_p_one_not_nan():
    a = np.array([0.1, 0.5, 0.0, 1.0])
    res = seeded_test(a[None], a[None].copy(), paired=True)
    assert res["p"] == 1.0 and res["wilcoxon_p"] == 1.0 and res["diff"] == 0.0
    assert not res["same_sign"]  # no difference has no sign


def test_holm_step_down():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_compare_flags_a_real_effect_and_not_a_null():
    rng = np.random.default_rng(1)
    base = rng.random(400)
    better = base + 0.1 + rng.normal(0, 0.05, 400)
    same = base + rng.normal(0, 0.05, 400)
    ref = _cell("bpr", [base])
    rows = compare([("", _cell("good", [better]), ref), ("", _cell("null", [same]), ref)], CFG)
    assert [r["significant"] for r in rows] == [True, False]
    assert [r["holds"] for r in rows] == [True, False]  # one seed: holds = significant
    assert all(r["p_holm"] >= r["p"] for r in rows)


def test_compare_refuses_runs_on_different_users():
    a = _run("a", {"recall@20": np.ones(3)}, users=np.array([0, 1, 2], dtype=np.int32))
    b = _run("b", {"recall@20": np.ones(3)}, users=np.array([0, 1, 3], dtype=np.int32))
    with pytest.raises(ValueError, match="different users"):
        compare([("", Cell((a,)), Cell((b,)))], CFG)


def _seeded(base: np.ndarray, shifts: list[float], rng: np.random.Generator) -> list[np.ndarray]:
    """One run per seed: the users' ``base`` moved by the seed's shift, plus per-user noise."""
    return [base + shift + rng.normal(0, 0.05, base.size) for shift in shifts]


def test_an_effect_consistent_across_seeds_holds_and_one_reversed_between_seeds_does_not():
    """The issue's acceptance: A is better than B by 0.05 in every one of three seeds (plus a
    little training noise), so it holds; C beats D by 0.05 in seed 1 and loses by 0.05 in
    seed 2, so it does not, although a paired test over users passes in each seed alone."""
    rng = np.random.default_rng(11)
    base = rng.random(N_USERS)
    consistent = (
        _cell("consistent", _seeded(base, [0.050, 0.056, 0.047], rng)),
        _cell("consistent-ref", _seeded(base, [0.0, 0.004, -0.002], rng)),
    )
    reversed_ = (
        _cell("reversed", _seeded(base, [0.05, -0.05], rng)),
        _cell("reversed-ref", _seeded(base, [0.0, 0.0], rng)),
    )
    rows = compare([("", *consistent), ("", *reversed_)], CFG)
    good, flip = rows
    assert good["paired_seeds"] and good["n_seeds_a"] == 3 and good["noise_estimated"]
    assert good["significant"] and good["same_sign"] and good["holds"] and good["diff"] > 0
    assert len(good["seed_diffs"]) == 3 and good["diff_min"] > 0

    assert flip["diff_min"] < 0 < flip["diff_max"] and not flip["same_sign"]
    assert not flip["significant"] and not flip["holds"]
    # ...yet each seed alone passes a paired t-test over users, by a wide margin
    for a, b in zip(reversed_[0].runs, reversed_[1].runs, strict=True):
        p = stats.ttest_rel(a.per_user["recall@20"], b.per_user["recall@20"]).pvalue
        assert p < 1e-6
    assert all(p < 1e-6 for p in flip["seed_p"])
    # the headline counts the effect that holds and not the reversed one
    shares = headline([{**good, "comparison": "x"}, {**flip, "comparison": "x"}])
    assert shares["x"]["better"] == 1 and shares["x"]["cases"] == 2


def test_significant_but_of_changing_sign_does_not_hold():
    """Four seeds agree and a fifth reverses, slightly: significant across seeds, yet not
    holding, and the headline counts it as a flip, not a win."""
    rng = np.random.default_rng(4)
    base = rng.random(N_USERS)
    a = _cell("a", [base + s for s in (0.05, 0.06, 0.05, 0.055, -0.004)])
    b = _cell("b", [base.copy() for _ in range(5)])
    (row,) = compare([("label", a, b)], CFG)
    assert row["significant"] and not row["same_sign"] and not row["holds"]
    assert headline([row])["label"] == {
        "cases": 1, "better": 0, "worse": 0, "flips": 1, "one_seed": 0, "share_better": 0.0
    }  # fmt: skip


def test_training_noise_widens_the_interval_over_the_users_alone():
    """The same users' differences with seed-to-seed noise added give a wider CI and fewer
    degrees of freedom than one run's test over users."""
    rng = np.random.default_rng(2)
    base = rng.random(N_USERS)
    a = np.stack(_seeded(base, [0.02, 0.05, 0.03], rng))
    b = np.stack(_seeded(base, [0.0, 0.0, 0.0], rng))
    across = seeded_test(a, b, paired=True)
    one = seeded_test(a.mean(axis=0)[None], b.mean(axis=0)[None], paired=True)
    assert across["diff"] == pytest.approx(one["diff"])
    assert across["ci_high"] - across["ci_low"] > 2 * (one["ci_high"] - one["ci_low"])
    assert across["df"] < 10 < one["df"]
    assert across["p"] > one["p"]


def test_different_seeds_compare_every_run_of_a_with_every_run_of_b():
    rng = np.random.default_rng(3)
    base = rng.random(N_USERS)
    a = _cell("a", _seeded(base, [0.05, 0.06], rng), seeds=[1, 2])
    b = _cell("b", _seeded(base, [0.0, 0.01, -0.01], rng), seeds=[1, 2, 3])
    (row,) = compare([("", a, b)], CFG)
    assert not row["paired_seeds"] and (row["n_seeds_a"], row["n_seeds_b"]) == (2, 3)
    assert len(row["seed_diffs"]) == 6 and row["same_sign"] and row["holds"]
    assert row["seeds_a"] == [1, 2] and row["seeds_b"] == [1, 2, 3]
    assert row["diff"] == pytest.approx(np.mean(row["seed_diffs"]))
    # a single run on one side borrows the other side's training noise
    single = _cell("single", _seeded(base, [0.05], rng), seeds=[9])
    (row,) = compare([("", single, b)], CFG)
    assert row["noise_estimated"] and not row["paired_seeds"] and len(row["seed_diffs"]) == 3
    (row,) = compare([("", single, _cell("one", [base], seeds=[1]))], CFG)
    assert not row["noise_estimated"]


def _write(folder: Path, run: Run) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(run.metrics))
    run.per_user.write_parquet(folder / "per_user.parquet")


def test_load_runs_reads_both_layouts_and_mixed_seed_counts(tmp_path):
    """Old ``<setting>/<model>/`` runs load as seed None beside ``seed-<n>/`` runs; cells
    group each (setting, model) with its seeds, whatever their number."""
    values = {"recall@20": np.linspace(0, 1, 10)}
    _write(tmp_path / "cnn_st/vbpr", _run("vbpr", values))
    for seed in (2023, 2022):
        _write(tmp_path / f"clip-pretrained/vbpr/seed-{seed}", _run("vbpr", values))
    _write(tmp_path / "e2e-clip/vbpr/seed-2022", _run("vbpr", values))
    runs = load_runs(tmp_path)
    assert sorted((r.setting, r.seed) for r in runs if r.setting != "cnn_st") == [
        ("clip-pretrained", 2022), ("clip-pretrained", 2023), ("e2e-clip", 2022)
    ]  # fmt: skip
    legacy = next(r for r in runs if r.setting == "cnn_st")
    assert legacy.seed is None and legacy.path == tmp_path / "cnn_st/vbpr"
    by_setting = {c.setting: c for c in cells(runs)}
    assert by_setting["clip-pretrained"].seeds == [2022, 2023]
    assert by_setting["e2e-clip"].seeds == [2022] and by_setting["cnn_st"].seeds == [None]
    assert by_setting["clip-pretrained"].runs[0].path == tmp_path / "clip-pretrained/vbpr/seed-2022"


def test_a_leftover_run_beside_seed_folders_is_left_out(tmp_path, caplog):
    values = {"recall@20": np.linspace(0, 1, 10)}
    _write(tmp_path / "cnn_st/vbpr", _run("vbpr", values))
    _write(tmp_path / "cnn_st/vbpr/seed-1", _run("vbpr", values))
    with caplog.at_level(logging.WARNING):
        runs = load_runs(tmp_path)
    assert [r.seed for r in runs] == [1]
    assert "seed-* folders replace it" in caplog.text


def test_a_seed_folder_needs_an_integer(tmp_path):
    _write(tmp_path / "cnn_st/vbpr/seed-x", _run("vbpr", {"recall@20": np.ones(3)}))
    with pytest.raises(ValueError, match="seed-<integer>"):
        load_runs(tmp_path)


def test_cell_mean_and_spread_over_seeds():
    cell = _cell("m", [np.full(4, 0.1), np.full(4, 0.3), np.full(4, 0.2)])
    assert cell.mean("recall@20") == pytest.approx(0.2)
    assert cell.spread("recall@20") == pytest.approx(0.2)
    assert _cell("m", [np.full(4, 0.1)]).spread("recall@20") is None
    with pytest.raises(ValueError, match="repeat"):
        _cell("m", [np.ones(4), np.ones(4)], seeds=[1, 1])
