"""`lmmrec compare`: runs across experiments, grouped by seeds, merged, paired and tested."""

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from scipy import stats
from typer.testing import CliRunner

from pipeline.report.compare import cross_pairs, encoder_stage, load_source, merge, setting_order
from pipeline.report.significance import Run
from stages.cli import app

N_USERS = 400


def _run(
    setting: str, model: str, recall: np.ndarray, users: np.ndarray | None = None,
    seed: int | None = None,
) -> Run:  # fmt: skip
    users = np.arange(len(recall), dtype=np.int32) if users is None else users
    per_user = pl.DataFrame({"user_id": users, "recall@20": recall, "ndcg@20": recall / 2})
    metrics = {"recall@20": float(recall.mean()), "ndcg@20": float(recall.mean() / 2)}
    return Run(setting, model, metrics, per_user, seed=seed)


def _write(models_dir: Path, run: Run) -> None:
    """The run's folder: ``<setting>/<model>/seed-<seed>/``, or the layout before seeds
    (``<setting>/<model>/``) for seed None."""
    folder = models_dir / run.setting / run.model
    if run.seed is not None:
        folder = folder / f"seed-{run.seed}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(run.metrics))
    run.per_user.write_parquet(folder / "per_user.parquet")


@pytest.fixture()
def experiments() -> tuple[list[Run], list[Run]]:
    """Two experiments as `dvc exp run -S encoder=vlmo` leaves them: cnn_st and BPR identical
    (not re-run), VLMo clearly better than CLIP for ``lattice`` and equal for ``vbpr``."""
    rng = np.random.default_rng(5)
    base = rng.random(N_USERS)
    noise = lambda: rng.normal(0, 0.05, N_USERS)  # noqa: E731
    shared = [_run("cnn_st", "lattice", base), _run("id", "bpr", base - 0.1)]
    clip = [
        *shared,
        _run("clip-pretrained", "lattice", base),
        _run("clip-pretrained", "vbpr", base),
    ]
    vlmo = [
        *shared,
        _run("vlmo-pretrained", "lattice", base + 0.1 + noise()),
        _run("vlmo-pretrained", "vbpr", base + noise()),
    ]
    return clip, vlmo


def test_encoder_stage_parses_feature_settings():
    assert encoder_stage("clip-finetuned") == ("clip", "finetuned")
    assert encoder_stage("vlmo-pretrained") == ("vlmo", "pretrained")
    assert encoder_stage("e2e-vlmo") == ("vlmo", "e2e")
    assert encoder_stage("cnn_st") is None and encoder_stage("id") is None


def test_identical_runs_shown_once_and_encoders_paired(experiments):
    clip, vlmo = experiments
    entries = merge([("main", clip), ("vlmo-exp", vlmo)])
    shown = sorted((e.cell.setting, e.cell.model) for e in entries)
    assert ("cnn_st (vlmo-exp)", "lattice") not in shown  # identical to main's: dropped
    assert ("cnn_st (main)", "lattice") in shown and ("id (main)", "bpr") in shown
    assert setting_order(entries) == [
        "cnn_st (main)", "clip-pretrained (main)", "vlmo-pretrained (vlmo-exp)"
    ]  # fmt: skip
    pairs = cross_pairs(entries)
    assert sorted((label, a.name, b.name) for label, a, b in pairs) == [
        ("pretrained: vlmo vs clip", "lattice [vlmo-pretrained (vlmo-exp)]",
         "lattice [clip-pretrained (main)]"),
        ("pretrained: vlmo vs clip", "vbpr [vlmo-pretrained (vlmo-exp)]",
         "vbpr [clip-pretrained (main)]"),
    ]  # fmt: skip


def test_runs_on_different_users_are_not_paired(caplog):
    base = np.random.default_rng(0).random(N_USERS)
    other_users = np.arange(N_USERS, 2 * N_USERS, dtype=np.int32)
    entries = merge(
        [("a", [_run("clip-pretrained", "vbpr", base)]),
         ("b", [_run("clip-pretrained", "vbpr", base + 0.01, other_users)])]
    )  # fmt: skip
    with caplog.at_level(logging.WARNING):
        assert cross_pairs(entries) == []
    assert "different test users" in caplog.text


def test_compare_command_flags_the_real_difference_only(experiments, tmp_path):
    clip, vlmo = experiments
    for label, runs in (("main", clip), ("vlmo-exp", vlmo)):
        for run in runs:
            _write(tmp_path / label / "models", run)
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app,
        ["compare", "--dir", f"main={tmp_path / 'main/models'}",
         "--dir", f"vlmo-exp={tmp_path / 'vlmo-exp/models'}", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    outcome = {(c["a"], c["metric"]): c for c in summary["comparisons"]}
    lattice = outcome["lattice [vlmo-pretrained (vlmo-exp)]", "recall@20"]
    vbpr = outcome["vbpr [vlmo-pretrained (vlmo-exp)]", "recall@20"]
    assert lattice["significant"] and lattice["diff"] > 0
    assert not vbpr["significant"]
    a = vlmo[2].per_user["recall@20"].to_numpy()
    assert lattice["p"] == pytest.approx(stats.ttest_rel(a, clip[2].per_user["recall@20"]).pvalue)
    assert summary["headline"]["pretrained: vlmo vs clip"]["better"] == 2  # recall and ndcg
    assert "vbpr" in (out / "compare.md").read_text()
    assert (out / "compare.html").read_text().startswith("<!DOCTYPE html>")


def test_compare_across_sources_tests_across_seeds(tmp_path):
    """Two experiments with two seeds each: VLMo beats CLIP for ``lattice`` in both seeds (it
    holds); for ``vbpr`` it wins in seed 1 and loses in seed 2, each significant over users
    alone, so it does not hold. Unchanged cnn_st cells are shown once; the spread is kept."""
    rng = np.random.default_rng(8)
    base = rng.random(N_USERS)
    noise = lambda: rng.normal(0, 0.05, N_USERS)  # noqa: E731
    shared = [_run("cnn_st", "lattice", base + 0.01 * s, seed=s) for s in (1, 2)]
    sources = {
        "main": [
            *shared,
            *(_run("clip-pretrained", m, base + noise(), seed=s)
              for m in ("lattice", "vbpr") for s in (1, 2)),
        ],
        "vlmo-exp": [
            *shared,
            *(_run("vlmo-pretrained", "lattice", base + 0.1 + noise(), seed=s) for s in (1, 2)),
            _run("vlmo-pretrained", "vbpr", base + 0.1 + noise(), seed=1),
            _run("vlmo-pretrained", "vbpr", base - 0.1 + noise(), seed=2),
        ],
    }  # fmt: skip
    for label, runs in sources.items():
        for run in runs:
            _write(tmp_path / label, run)
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app,
        ["compare", "--dir", f"main={tmp_path / 'main'}", "--dir",
         f"vlmo-exp={tmp_path / 'vlmo-exp'}", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"]["vlmo-pretrained (vlmo-exp)/vbpr"] == [1, 2]
    assert "cnn_st (vlmo-exp)/lattice" not in summary["seeds"]  # identical: shown once
    assert summary["spread"]["recall@20"]["cnn_st (main)/lattice"] == pytest.approx(0.01)
    outcome = {(c["a"], c["metric"]): c for c in summary["comparisons"]}
    lattice = outcome["lattice [vlmo-pretrained (vlmo-exp)]", "recall@20"]
    vbpr = outcome["vbpr [vlmo-pretrained (vlmo-exp)]", "recall@20"]
    assert lattice["paired_seeds"] and lattice["same_sign"] and lattice["holds"]
    assert all(p < 1e-6 for p in vbpr["seed_p"]) and not vbpr["same_sign"]
    assert not vbpr["holds"]
    assert summary["headline"]["pretrained: vlmo vs clip"]["better"] == 2  # lattice, 2 metrics
    assert summary["seed_note"] == ""
    report = (out / "compare.md").read_text()
    assert "## Run-to-run spread" in report and "0.0100 (2 seeds)" in report


def test_an_old_layout_source_against_a_seeded_one_says_it_has_one_seed(tmp_path):
    """A revision from before seeds (one run, seed None) against one with a single seed: the
    runs compare over users only, and the report says so."""
    base = np.random.default_rng(9).random(N_USERS)
    _write(tmp_path / "old", _run("clip-pretrained", "vbpr", base))
    _write(tmp_path / "new", _run("clip-pretrained", "vbpr", base + 0.05, seed=2022))
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app, ["compare", "--dir", f"old={tmp_path / 'old'}", "--dir", f"new={tmp_path / 'new'}",
              "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    (row, _) = summary["comparisons"]
    assert row["seeds_a"] == [2022] and row["seeds_b"] == [None] and not row["noise_estimated"]
    assert "cannot separate training noise from the effect" in summary["seed_note"]
    assert summary["seed_note"] in (out / "compare.md").read_text()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_load_source_reads_a_git_revision_through_dvc(experiments, tmp_path):
    """A run committed at one revision and changed afterwards is read as it was."""
    clip, _ = experiments
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)

    git("init", "-q")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    subprocess.run(
        [sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True, capture_output=True
    )
    _write(repo / "models/demo", clip[2])
    git("add", "-A")
    git("commit", "-q", "-m", "first")
    _write(repo / "models/demo", _run("clip-pretrained", "lattice", np.zeros(N_USERS)))
    git("commit", "-q", "-am", "second")
    old = load_source("first", "models/demo", rev="HEAD~1", repo=str(repo))
    assert [(r.setting, r.model, r.seed) for r in old] == [("clip-pretrained", "lattice", None)]
    assert old[0].per_user.equals(clip[2].per_user)
    # the next revision moves to seed folders and keeps its seeds
    for seed in (1, 2):
        _write(repo / "models/demo", _run("cnn_st", "lattice", np.ones(N_USERS), seed=seed))
    git("add", "-A")
    git("commit", "-q", "-m", "seeds")
    new = load_source("seeds", "models/demo", rev="HEAD", repo=str(repo))
    assert sorted((r.setting, r.seed) for r in new) == [
        ("clip-pretrained", None), ("cnn_st", 1), ("cnn_st", 2)
    ]  # fmt: skip
    with pytest.raises(FileNotFoundError, match="no trained runs"):
        load_source("none", "models/other", rev="HEAD", repo=str(repo))
