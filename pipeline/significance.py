"""Paired significance tests over per-user results, and the report that presents them."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import polars as pl
from scipy import stats


@dataclass(frozen=True)
class ReportConfig:
    """What the report tests: the significance level and the metrics compared."""

    alpha: float = 0.05
    metrics: tuple[str, ...] = ("recall@20", "ndcg@20")

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must lie in (0, 1), got {self.alpha}")


# The paper's comparisons, each as (label, setting A, setting B): is A better than B?
PAPER_COMPARISONS: tuple[tuple[str, str, str], ...] = (
    ("pretrained LMM vs cnn_st", "{encoder}-pretrained", "cnn_st"),
    ("fine-tuned vs pretrained", "{encoder}-finetuned", "{encoder}-pretrained"),
    ("end-to-end vs fine-tuned", "e2e-{encoder}", "{encoder}-finetuned"),
    ("end-to-end vs pretrained", "e2e-{encoder}", "{encoder}-pretrained"),
)


def encoder_settings(encoder: str) -> list[str]:
    """The feature settings of the paper's table for the LMM ``encoder``, in column order."""
    return ["cnn_st", f"{encoder}-pretrained", f"{encoder}-finetuned", f"e2e-{encoder}"]


def present_settings(runs: Sequence[Run], settings: Sequence[str]) -> list[str]:
    """The ``settings`` that at least one of ``runs`` was trained in, in their order."""
    trained = {r.setting for r in runs}
    return [s for s in settings if s in trained]


@dataclass(frozen=True)
class Run:
    """One trained recommender: its setting (feature set), model name and per-user results;
    ``path`` is its folder (for the training curves), None when built in memory."""

    setting: str
    model: str
    metrics: dict
    per_user: pl.DataFrame
    path: Path | None = None

    @property
    def name(self) -> str:
        return f"{self.model} [{self.setting}]"


def load_runs(models_dir: str | Path, fs: fsspec.AbstractFileSystem | None = None) -> list[Run]:
    """Every ``<setting>/<model>/`` under ``models_dir`` with metrics.json and per_user.parquet;
    from the local disk, or from ``fs`` (an fsspec filesystem such as DVC's at a git rev)."""
    local = fs is None
    fs = fsspec.filesystem("file") if local else fs
    runs = []
    for per_user in sorted(fs.glob(f"{str(models_dir).rstrip('/')}/*/*/per_user.parquet")):
        run_dir = Path(per_user).parent
        metrics_file = str(run_dir / "metrics.json")
        if not fs.exists(metrics_file):
            raise FileNotFoundError(f"{run_dir}: per_user.parquet without metrics.json")
        with fs.open(per_user, "rb") as f:
            table = pl.read_parquet(f)
        runs.append(
            Run(
                setting=run_dir.parent.name,
                model=run_dir.name,
                metrics=json.loads(fs.read_text(metrics_file)),
                per_user=table,
                path=run_dir if local else None,
            )
        )
    return runs


def paired_test(a: np.ndarray, b: np.ndarray, confidence: float = 0.95) -> dict[str, float]:
    """Two-sided paired t-test of ``a`` vs ``b`` (same users, same order), plus robustness checks.

    Returns the means, the mean difference a-b with its confidence interval, Cohen's d_z (mean
    difference over its standard deviation), the t statistic and p-value, and the Wilcoxon
    signed-rank p-value. Identical samples give p = 1 rather than NaN.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size < 2:
        raise ValueError(
            f"paired samples need equal 1-d shapes of size >= 2, got {a.shape}, {b.shape}"
        )
    diff = a - b
    n = diff.size
    mean = float(diff.mean())
    sd = float(diff.std(ddof=1))
    if sd == 0.0:
        t, p, half = (0.0, 1.0, 0.0) if mean == 0.0 else (math.copysign(math.inf, mean), 0.0, 0.0)
    else:
        res = stats.ttest_rel(a, b)
        t, p = float(res.statistic), float(res.pvalue)
        half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n))
    wilcoxon_p = 1.0 if not np.any(diff) else float(stats.wilcoxon(a, b).pvalue)
    return {
        "n": n,
        "mean_a": float(a.mean()),
        "mean_b": float(b.mean()),
        "diff": mean,
        "ci_low": mean - half,
        "ci_high": mean + half,
        "effect_size_dz": mean / sd if sd > 0 else 0.0,
        "t": t,
        "p": p,
        "wilcoxon_p": wilcoxon_p,
    }


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1)."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def _aligned(a: Run, b: Run, metric: str) -> tuple[np.ndarray, np.ndarray]:
    for run in (a, b):
        if metric not in run.per_user.columns:
            raise KeyError(f"{run.name}: per_user.parquet has no column {metric!r}")
    joined = a.per_user.select("user_id", pl.col(metric).alias("a")).join(
        b.per_user.select("user_id", pl.col(metric).alias("b")), on="user_id", how="full"
    )
    if joined["a"].null_count() or joined["b"].null_count():
        raise ValueError(f"{a.name} and {b.name} were tested on different users: not pairable")
    return joined["a"].to_numpy(), joined["b"].to_numpy()


def paper_pairs(runs: Sequence[Run], encoder: str) -> list[tuple[str, Run, Run]]:
    """(comparison label, A, B) for each of the paper's comparisons and each model trained in
    both settings; comparisons whose settings are missing are left out."""
    by_key = {(r.setting, r.model): r for r in runs}
    models = sorted({r.model for r in runs})
    pairs = []
    for label, a_setting, b_setting in PAPER_COMPARISONS:
        a_setting, b_setting = a_setting.format(encoder=encoder), b_setting.format(encoder=encoder)
        for model in models:
            if (a_setting, model) in by_key and (b_setting, model) in by_key:
                pairs.append((label, by_key[a_setting, model], by_key[b_setting, model]))
    return pairs


def compare(
    pairs: Sequence[tuple[str, Run, Run]], cfg: ReportConfig
) -> list[dict[str, float | str | bool]]:
    """Paired tests for each (comparison label, a, b) and metric, Holm-corrected across the
    whole family."""
    rows: list[dict] = []
    for label, a, b in pairs:
        for metric in cfg.metrics:
            x, y = _aligned(a, b, metric)
            rows.append(
                {"comparison": label, "a": a.name, "b": b.name, "metric": metric,
                 **paired_test(x, y)}
            )  # fmt: skip
    for row, p_holm in zip(rows, holm([r["p"] for r in rows]), strict=True):
        row["p_holm"] = p_holm
        row["significant"] = p_holm < cfg.alpha
    return rows


def headline(rows: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Per comparison label: how many (model, metric) cases A is significantly better and
    significantly worse than B in (after the family's correction), and the share better."""
    out: dict[str, dict[str, float]] = {}
    for row in rows:
        entry = out.setdefault(row["comparison"], {"cases": 0, "better": 0, "worse": 0})
        entry["cases"] += 1
        if row["significant"]:
            entry["better" if row["diff"] > 0 else "worse"] += 1
    for entry in out.values():
        entry["share_better"] = entry["better"] / entry["cases"]
    return out


def mean_ci(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """The mean of per-user ``values`` and the half-width of its t confidence interval."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return float(values.mean()), 0.0
    sem = float(values.std(ddof=1)) / math.sqrt(values.size)
    return float(values.mean()), float(stats.t.ppf(0.5 + confidence / 2, values.size - 1) * sem)
