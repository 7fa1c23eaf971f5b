"""The significance report: results table, paired comparisons, and a JSON summary."""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.significance import ReportConfig, Run


def _fmt(x: float) -> str:
    return f"{x:.4f}"


def _p(x: float) -> str:
    return f"{x:.2e}" if x < 1e-3 else f"{x:.4f}"


def results_table(
    runs: Sequence[Run], baselines: dict[str, dict[str, float]], metrics: Sequence[str]
) -> str:
    """Markdown table: one row per trained run and non-learned baseline, test metrics."""
    lines = [
        "| model | features | " + " | ".join(metrics) + " |",
        "|---|---|" + "---|" * len(metrics),
    ]
    for run in runs:
        vals = " | ".join(_fmt(run.metrics[m]) for m in metrics)
        lines.append(f"| {run.model} | {run.setting} | {vals} |")
    for name, vals in baselines.items():
        lines.append(f"| {name} | none | " + " | ".join(_fmt(vals[m]) for m in metrics) + " |")
    return "\n".join(lines)


def comparisons_table(rows: Sequence[dict]) -> str:
    """Markdown table of paired tests: difference, CI, effect size, raw and Holm p-values."""
    lines = [
        "| A | B | metric | mean A | mean B | A−B [95% CI] | d_z | t | p | p (Holm) "
        "| Wilcoxon p | significant |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ci = f"{r['diff']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]"
        lines.append(
            f"| {r['a']} | {r['b']} | {r['metric']} | {_fmt(r['mean_a'])} | {_fmt(r['mean_b'])} "
            f"| {ci} | {r['effect_size_dz']:.3f} | {r['t']:.3f} | {_p(r['p'])} "
            f"| {_p(r['p_holm'])} | {_p(r['wilcoxon_p'])} | {'yes' if r['significant'] else 'no'} |"
        )
    return "\n".join(lines)


def render_markdown(
    dataset: str,
    runs: Sequence[Run],
    baselines: dict[str, dict[str, float]],
    rows: Sequence[dict],
    cfg: ReportConfig,
) -> str:
    """The whole significance.md."""
    n_users = rows[0]["n"] if rows else (runs[0].per_user.height if runs else 0)
    wins = sum(1 for r in rows if r["significant"] and r["diff"] > 0)
    return (
        "\n\n".join(
            [
                f"# Significance report: {dataset}",
                f"Test users: {n_users}. Paired two-sided t-tests over test users; "
                f"Holm–Bonferroni correction across all {len(rows)} tests; "
                f"significant at α = {cfg.alpha} after correction. "
                "The Wilcoxon signed-rank test is shown as a robustness check.",
                "## Test results",
                results_table(runs, baselines, cfg.metrics),
                "## Paired comparisons",
                comparisons_table(rows) if rows else "No pairs to compare.",
                f"In {wins} of {len(rows)} comparisons A is significantly better than B.",
            ]
        )
        + "\n"
    )


def summary(
    runs: Sequence[Run], baselines: dict[str, dict[str, float]], rows: Sequence[dict]
) -> dict:
    """Machine-readable summary (a DVC metric): test metrics per run and the test outcomes."""
    return {
        "runs": {f"{r.setting}/{r.model}": {k: v for k, v in r.metrics.items()} for r in runs},
        "baselines": baselines,
        "comparisons": [
            {k: r[k] for k in ("a", "b", "metric", "diff", "p", "p_holm", "significant")}
            for r in rows
        ],
        "significant_wins": sum(1 for r in rows if r["significant"] and r["diff"] > 0),
        "tests": len(rows),
    }
