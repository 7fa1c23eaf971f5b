"""Significance tests over per-user results of replicated training runs (seeds), and the
grouping of runs into the cells the report presents."""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import fsspec
import numpy as np
import polars as pl

from pipeline.data.schemas import SEED_PREFIX
from pipeline.encoders.base import BASELINE
from pipeline.features.names import E2E, setting

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportConfig:
    """What the report tests: the significance level and the metrics compared."""

    alpha: float = 0.05
    metrics: tuple[str, ...] = ("recall@20", "ndcg@20")

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must lie in (0, 1), got {self.alpha}")


# The paper's comparisons, each as (label, stage A, stage B): is the LMM's setting at stage A
# better than at B (the baseline: the cnn_st set)?
PAPER_COMPARISONS: tuple[tuple[str, str, str], ...] = (
    ("pretrained LMM vs cnn_st", "pretrained", BASELINE),
    ("fine-tuned vs pretrained", "finetuned", "pretrained"),
    ("end-to-end vs fine-tuned", E2E, "finetuned"),
    ("end-to-end vs pretrained", E2E, "pretrained"),
)


def present_settings(cells: Sequence[Cell], settings: Sequence[str]) -> list[str]:
    """The ``settings`` that at least one of ``cells`` was trained in, in their order."""
    trained = {c.setting for c in cells}
    return [s for s in settings if s in trained]


@dataclass(frozen=True)
class Run:
    """One trained recommender: its setting (feature set), model name, training seed (None
    for a run saved before seeds were an axis) and per-user results; ``path`` is its folder
    (for the training curves), None when built in memory."""

    setting: str
    model: str
    metrics: dict
    per_user: pl.DataFrame
    path: Path | None = None
    seed: int | None = None

    @property
    def name(self) -> str:
        return f"{self.model} [{self.setting}]"


def _seed_key(seed: int | None) -> tuple[bool, int]:
    return (seed is not None, seed or 0)


@dataclass(frozen=True)
class Cell:
    """One (setting, model) of the tables with all its training runs, in seed order: the
    tables show their mean and spread, the comparisons test across them."""

    runs: tuple[Run, ...]

    def __post_init__(self) -> None:
        if not self.runs:
            raise ValueError("a cell needs at least one run")
        if len({(r.setting, r.model) for r in self.runs}) != 1:
            raise ValueError(f"one cell holds one setting and model, got {self.names()}")
        seeds = [r.seed for r in self.runs]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"{self.runs[0].name}: seeds {seeds} repeat")

    def names(self) -> list[str]:
        """Each run's name with its seed, for messages."""
        return [f"{r.name} seed {r.seed}" for r in self.runs]

    @property
    def setting(self) -> str:
        return self.runs[0].setting

    @property
    def model(self) -> str:
        return self.runs[0].model

    @property
    def name(self) -> str:
        return self.runs[0].name

    @property
    def seeds(self) -> list[int | None]:
        return [r.seed for r in self.runs]

    def values(self, metric: str) -> np.ndarray:
        """[seeds] each run's test ``metric`` from its metrics.json."""
        return np.array([r.metrics[metric] for r in self.runs], dtype=np.float64)

    def mean(self, metric: str) -> float:
        """The mean over seeds of the runs' ``metric``."""
        return float(self.values(metric).mean())

    def spread(self, metric: str) -> float | None:
        """Largest minus smallest ``metric`` over seeds; None with a single run."""
        values = self.values(metric)
        return float(values.max() - values.min()) if values.size > 1 else None

    def per_user(self, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """(user ids [users], values [seeds, users]) of ``metric``, users sorted by id; the
        runs must have been tested on the same users."""
        users, rows = None, []
        for run in self.runs:
            if metric not in run.per_user.columns:
                raise KeyError(f"{run.name}: per_user.parquet has no column {metric!r}")
            table = run.per_user.select("user_id", metric).sort("user_id")
            ids = table["user_id"].to_numpy()
            if users is None:
                users = ids
            elif not np.array_equal(users, ids):
                raise ValueError(f"{self.names()} were tested on different users")
            rows.append(table[metric].to_numpy().astype(np.float64))
        return users, np.stack(rows)


def cells(runs: Sequence[Run]) -> list[Cell]:
    """The runs grouped by (setting, model), sorted by those, each cell's runs by seed."""
    ordered = sorted(runs, key=lambda r: (r.setting, r.model, _seed_key(r.seed)))
    return [
        Cell(tuple(group))
        for _, group in itertools.groupby(ordered, key=lambda r: (r.setting, r.model))
    ]


def _seed_of(folder: str) -> int:
    try:
        return int(folder.removeprefix(SEED_PREFIX))
    except ValueError:
        raise ValueError(f"{folder}: a run folder is named {SEED_PREFIX}<integer>") from None


def load_runs(models_dir: str | Path, fs: fsspec.AbstractFileSystem | None = None) -> list[Run]:
    """Every run under ``models_dir``: ``<setting>/<model>/seed-<seed>/`` and, as seed None,
    the layout before seeds, ``<setting>/<model>/``, each with metrics.json and
    per_user.parquet; from the local disk, or from ``fs`` (an fsspec filesystem such as DVC's
    at a git rev). A model folder with seed folders ignores its own older files (a leftover)."""
    local = fs is None
    fs = fsspec.filesystem("file") if local else fs
    root = str(models_dir).rstrip("/")
    seeded = sorted(fs.glob(f"{root}/*/*/{SEED_PREFIX}*/per_user.parquet"))
    with_seeds = {Path(p).parent.parent for p in seeded}
    runs = []
    for per_user in sorted(fs.glob(f"{root}/*/*/per_user.parquet")) + seeded:
        run_dir = Path(per_user).parent
        seed = _seed_of(run_dir.name) if run_dir.name.startswith(SEED_PREFIX) else None
        model_dir = run_dir if seed is None else run_dir.parent
        if seed is None and model_dir in with_seeds:
            log.warning("%s: left out, its seed-* folders replace it", per_user)
            continue
        metrics_file = str(run_dir / "metrics.json")
        if not fs.exists(metrics_file):
            raise FileNotFoundError(f"{run_dir}: per_user.parquet without metrics.json")
        with fs.open(per_user, "rb") as f:
            table = pl.read_parquet(f)
        runs.append(
            Run(
                setting=model_dir.parent.name,
                model=model_dir.name,
                metrics=json.loads(fs.read_text(metrics_file)),
                per_user=table,
                path=run_dir if local else None,
                seed=seed,
            )
        )
    return runs


def _stats() -> ModuleType:
    """scipy.stats, imported when a test runs: importing it costs ~0.7 s, which every stage
    would pay, since the params schema imports this module for ``ReportConfig``."""
    from scipy import stats

    return stats


def _seed_variance(
    means_a: np.ndarray, means_b: np.ndarray, paired: bool
) -> list[tuple[float, int]]:
    """(variance of the difference of the seed means, its degrees of freedom) per independent
    estimate of training noise; empty when no side has two runs."""
    if paired:
        k = means_a.size
        return [(float((means_a - means_b).var(ddof=1)) / k, k - 1)] if k > 1 else []
    ka, kb = means_a.size, means_b.size
    if ka > 1 and kb > 1:
        return [
            (float(means_a.var(ddof=1)) / ka, ka - 1),
            (float(means_b.var(ddof=1)) / kb, kb - 1),
        ]
    if ka > 1 or kb > 1:  # one side's noise stands in for the single run's (same size assumed)
        varied = means_a if ka > 1 else means_b
        return [(float(varied.var(ddof=1)) * (1 / ka + 1 / kb), varied.size - 1)]
    return []


def _t_test(
    mean: float, terms: Sequence[tuple[float, float]], confidence: float = 0.95
) -> tuple[float, float, float, float]:
    """(t, df, two-sided p, CI half-width) of ``mean`` whose variance is the sum of the
    (variance, df) ``terms``, with Welch–Satterthwaite df; zero variance gives p = 1 for a
    zero mean and p = 0 otherwise, rather than NaN."""
    var = sum(v for v, _ in terms)
    if var == 0.0:
        df = float(min(d for _, d in terms))
        return (0.0, df, 1.0, 0.0) if mean == 0.0 else (math.copysign(math.inf, mean), df, 0.0, 0.0)
    df = var**2 / sum(v**2 / d for v, d in terms)
    se = math.sqrt(var)
    t = mean / se
    p = float(2 * _stats().t.sf(abs(t), df))
    return t, df, p, float(_stats().t.ppf(0.5 + confidence / 2, df) * se)


def seeded_test(
    a: np.ndarray, b: np.ndarray, paired: bool, confidence: float = 0.95
) -> dict[str, float | int | bool | list[float]]:
    """Two-sided test of A vs B over users and training runs: ``a`` [seeds A, users] and
    ``b`` [seeds B, users] hold per-user values, users in the same order.

    D = mean(a) - mean(b). Its variance adds the users' part, var over users of the
    seed-averaged per-user differences / users (n-1 df), and the runs' part: with ``paired``
    seeds (row i of a with row i of b, same seed) var over seeds of the per-seed differences /
    seeds (k-1 df); otherwise var of A's seed means / its seeds + the same for B (a side with
    one run borrows the other's variance). t = D / se with Welch–Satterthwaite df. The
    user-by-seed interaction is counted in both parts, which errs on the safe side. One run
    per side is the paired t-test over users. Also: each seed's difference (paired: per seed;
    otherwise every A run minus every B run) and whether all share one sign, Cohen's d_z and
    the Wilcoxon p-value of the seed-averaged per-user differences.
    """
    a = np.atleast_2d(np.asarray(a, dtype=np.float64))
    b = np.atleast_2d(np.asarray(b, dtype=np.float64))
    if a.shape[1] != b.shape[1] or a.shape[1] < 2:
        raise ValueError(f"need the same >= 2 users on both sides, got {a.shape}, {b.shape}")
    if paired and a.shape[0] != b.shape[0]:
        raise ValueError(f"paired seeds need as many runs on both sides, got {a.shape}, {b.shape}")
    n = a.shape[1]
    user_diff = a.mean(axis=0) - b.mean(axis=0)
    mean = float(user_diff.mean())
    sd = float(user_diff.std(ddof=1))
    means_a, means_b = a.mean(axis=1), b.mean(axis=1)
    if paired:
        pairings = [(i, i) for i in range(a.shape[0])]
    else:
        pairings = list(itertools.product(range(a.shape[0]), range(b.shape[0])))
    seed_diffs = np.array([means_a[i] - means_b[j] for i, j in pairings])
    terms = [(sd**2 / n, n - 1), *_seed_variance(means_a, means_b, paired)]
    t, df, p, half = _t_test(mean, terms, confidence)
    seed_p = []
    for i, j in pairings:
        d = a[i] - b[j]
        seed_p.append(_t_test(float(d.mean()), [(float(d.var(ddof=1)) / n, n - 1)])[2])
    return {
        "n": n,
        "mean_a": float(a.mean()),
        "mean_b": float(b.mean()),
        "diff": mean,
        "ci_low": mean - half,
        "ci_high": mean + half,
        "effect_size_dz": mean / sd if sd > 0 else 0.0,
        "t": t,
        "df": df,
        "p": p,
        "wilcoxon_p": float(_stats().wilcoxon(user_diff).pvalue) if np.any(user_diff) else 1.0,
        "n_seeds_a": a.shape[0],
        "n_seeds_b": b.shape[0],
        "paired_seeds": paired,
        "noise_estimated": max(a.shape[0], b.shape[0]) > 1,
        "seed_diffs": [float(d) for d in seed_diffs],
        "seed_p": seed_p,
        "diff_min": float(seed_diffs.min()),
        "diff_max": float(seed_diffs.max()),
        "same_sign": bool(np.all(seed_diffs > 0) or np.all(seed_diffs < 0)),
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


def _aligned(a: Cell, b: Cell, metric: str) -> tuple[np.ndarray, np.ndarray]:
    users_a, values_a = a.per_user(metric)
    users_b, values_b = b.per_user(metric)
    if not np.array_equal(users_a, users_b):
        raise ValueError(f"{a.name} and {b.name} were tested on different users: not pairable")
    return values_a, values_b


def paired_seeds(a: Cell, b: Cell) -> bool:
    """Whether the runs of ``a`` and ``b`` pair by seed: both have the same seeds (a training
    seed shares initialisation and sampling across settings, so its runs' noise may agree)."""
    return a.seeds == b.seeds


def paper_pairs(cells: Sequence[Cell], encoder: str) -> list[tuple[str, Cell, Cell]]:
    """(comparison label, A, B) for each of the paper's comparisons and each model trained in
    both settings; comparisons whose settings are missing are left out."""
    by_key = {(c.setting, c.model): c for c in cells}
    models = sorted({c.model for c in cells})
    pairs = []
    for label, a_stage, b_stage in PAPER_COMPARISONS:
        a_setting, b_setting = setting(encoder, a_stage), setting(encoder, b_stage)
        for model in models:
            if (a_setting, model) in by_key and (b_setting, model) in by_key:
                pairs.append((label, by_key[a_setting, model], by_key[b_setting, model]))
    return pairs


def compare(pairs: Sequence[tuple[str, Cell, Cell]], cfg: ReportConfig) -> list[dict]:
    """``seeded_test`` for each (comparison label, a, b) and metric, Holm-corrected across the
    whole family; a comparison holds when significant after Holm and of one sign in every
    seed."""
    rows: list[dict] = []
    for label, a, b in pairs:
        for metric in cfg.metrics:
            x, y = _aligned(a, b, metric)
            rows.append(
                {"comparison": label, "a": a.name, "b": b.name, "metric": metric,
                 "seeds_a": a.seeds, "seeds_b": b.seeds,
                 **seeded_test(x, y, paired_seeds(a, b))}
            )  # fmt: skip
    for row, p_holm in zip(rows, holm([r["p"] for r in rows]), strict=True):
        row["p_holm"] = p_holm
        row["significant"] = p_holm < cfg.alpha
        row["holds"] = row["significant"] and row["same_sign"]
    return rows


def headline(rows: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Per comparison label: in how many (model, metric) cases A is better and worse than B
    in a way that holds (significant after the family's correction, one sign in every seed),
    the share better, how many were significant but changed sign between seeds, and how
    many rest on one training run per side (training noise not separable)."""
    out: dict[str, dict[str, float]] = {}
    for row in rows:
        entry = out.setdefault(
            row["comparison"], {"cases": 0, "better": 0, "worse": 0, "flips": 0, "one_seed": 0}
        )
        entry["cases"] += 1
        if row["holds"]:
            entry["better" if row["diff"] > 0 else "worse"] += 1
        elif row["significant"]:
            entry["flips"] += 1
        entry["one_seed"] += not row["noise_estimated"]
    for entry in out.values():
        entry["share_better"] = entry["better"] / entry["cases"]
    return out


def mean_ci(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """The mean of per-user ``values`` and the half-width of its t confidence interval."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return float(values.mean()), 0.0
    sem = float(values.std(ddof=1)) / math.sqrt(values.size)
    return float(values.mean()), float(_stats().t.ppf(0.5 + confidence / 2, values.size - 1) * sem)
