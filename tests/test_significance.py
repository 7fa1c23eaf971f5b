import numpy as np
import polars as pl
import pytest
from scipy import stats

from pipeline.significance import ReportConfig, Run, compare, holm, paired_test


def _run(model: str, values: dict[str, np.ndarray], users: np.ndarray | None = None) -> Run:
    n = len(next(iter(values.values())))
    users = np.arange(n, dtype=np.int32) if users is None else users
    per_user = pl.DataFrame({"user_id": users, **values})
    return Run("feat", model, {k: float(v.mean()) for k, v in values.items()}, per_user)


def test_paired_test_matches_scipy_and_ci_contains_diff():
    rng = np.random.default_rng(0)
    a = rng.random(200)
    b = a - 0.05 + rng.normal(0, 0.1, 200)
    res = paired_test(a, b)
    ref = stats.ttest_rel(a, b)
    assert res["p"] == pytest.approx(ref.pvalue)
    assert res["t"] == pytest.approx(ref.statistic)
    assert res["ci_low"] < res["diff"] < res["ci_high"]
    assert res["diff"] == pytest.approx((a - b).mean())
    assert res["wilcoxon_p"] == pytest.approx(stats.wilcoxon(a, b).pvalue)


def test_identical_samples_give_p_one_not_nan():
    a = np.array([0.1, 0.5, 0.0, 1.0])
    res = paired_test(a, a.copy())
    assert res["p"] == 1.0 and res["wilcoxon_p"] == 1.0 and res["diff"] == 0.0


def test_holm_step_down():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_compare_flags_a_real_effect_and_not_a_null():
    rng = np.random.default_rng(1)
    base = rng.random(400)
    better = base + 0.1 + rng.normal(0, 0.05, 400)
    same = base + rng.normal(0, 0.05, 400)
    metrics = {"recall@20": base}
    ref = _run("bpr", metrics)
    rows = compare(
        [
            ("", _run("good", {"recall@20": better}), ref),
            ("", _run("null", {"recall@20": same}), ref),
        ],
        ReportConfig(alpha=0.05, metrics=("recall@20",)),
    )
    assert [r["significant"] for r in rows] == [True, False]
    assert all(r["p_holm"] >= r["p"] for r in rows)


def test_compare_refuses_runs_on_different_users():
    a = _run("a", {"recall@20": np.ones(3)}, users=np.array([0, 1, 2], dtype=np.int32))
    b = _run("b", {"recall@20": np.ones(3)}, users=np.array([0, 1, 3], dtype=np.int32))
    with pytest.raises(ValueError, match="different users"):
        compare([("", a, b)], ReportConfig(metrics=("recall@20",)))
