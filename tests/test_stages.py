"""The stage commands end to end on a tiny demo world, through the CLI dvc.yaml calls."""

import json
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from stages.cli import app

ROOT = Path(__file__).parents[1]


def tiny_params(tmp_path: Path, **changes) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["demo"].update(n_items=120, n_users=220)
    params["pretrain_corpus"].update(n_pairs=300)
    params["weights"].update(epochs=1, batch_size=32, holdout=0.1)
    params["cnn_weights"].update(epochs=1, batch_size=32, holdout_pairs=32)
    params["finetune"].update(epochs=2, batch_size=16, patience=0)
    params["train"].update(max_epochs=3)
    for key, value in changes.items():
        section, _, name = key.partition(".")
        if name:
            params[section][name] = value
        else:
            params[section] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def invoke(*args: str) -> None:
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("run")
    p = tiny_params(tmp)
    raw, proc, weights = tmp / "raw", tmp / "processed", tmp / "weights"
    feats, models = tmp / "features/clip-pretrained", tmp / "models"
    invoke("download", "--out", raw, "--params", p)
    invoke("preprocess", "--raw", raw, "--out", proc, "--params", p)
    invoke("weights", "--out", weights / "clip-pretrained", "--params", p)
    invoke("weights", "--encoder", "cnn_st", "--out", weights / "cnn_st", "--params", p)
    finetune = ["--items", proc / "items.parquet", "--weights", weights / "clip-pretrained"]
    finetune += ["--out", weights / "clip-finetuned", "--metrics", tmp / "finetune.json"]
    invoke("finetune", *finetune, "--params", p)
    for feature_set in ("cnn_st", "clip-pretrained", "clip-finetuned"):
        invoke(
            "extract",
            "--feature-set",
            feature_set,
            "--items",
            proc / "items.parquet",
            "--published",
            proc / "image_features.parquet",
            "--weights",
            weights / feature_set,
            "--out",
            tmp / "features" / feature_set,
            "--params",
            p,
        )
    inter = proc / "interactions.parquet"
    invoke(
        "train",
        "--model",
        "vbpr",
        "--feature-set",
        "clip-pretrained",
        "--interactions",
        inter,
        "--features",
        feats,
        "--out",
        models / "clip-pretrained/vbpr",
        "--params",
        p,
    )
    invoke(
        "train",
        "--model",
        "bpr",
        "--feature-set",
        "id",
        "--interactions",
        inter,
        "--out",
        models / "id/bpr",
        "--params",
        p,
    )
    invoke(
        "report",
        "--interactions",
        inter,
        "--models",
        models,
        "--out",
        tmp / "reports",
        "--params",
        p,
    )
    return tmp


def test_feature_store_is_readable_with_polars_and_faiss(pipeline_run):
    items = pl.read_parquet(pipeline_run / "processed/items.parquet")
    feats = pl.read_parquet(pipeline_run / "features/clip-pretrained/items.parquet")
    assert feats.height == items.height
    assert feats["item_id"].to_list() == items["item_id"].to_list()
    assert feats.schema["image"] == pl.Array(pl.Float32, feats.schema["image"].size)
    image = np.stack(feats["image"].to_numpy())
    assert np.allclose(np.linalg.norm(image, axis=1), 1.0, atol=1e-5)
    index = faiss.read_index(str(pipeline_run / "features/clip-pretrained/image.faiss"))
    scores, ids = index.search(image[:10], 1)
    assert np.allclose(scores[:, 0], 1.0, atol=1e-5)


def test_report_pairs_vbpr_with_bpr(pipeline_run):
    report = (pipeline_run / "reports/significance.md").read_text()
    assert "| vs bpr | vbpr [clip-pretrained] | bpr [id] | recall@20 |" in report
    assert "data:image/png;base64," in (pipeline_run / "reports/significance.html").read_text()
    assert "most_popular" in report and "random" in report


def test_stats_command_prints_counts(pipeline_run):
    result = CliRunner().invoke(app, ["stats", "processed", "--processed", str(pipeline_run)])
    assert result.exit_code == 0
    assert "malformed_review_lines" in result.output and "missing_images" in result.output
    result = CliRunner().invoke(app, ["stats", "nowhere", "--processed", str(pipeline_run)])
    assert result.exit_code == 1 and "not found" in result.output


def test_features_show_prints_schema_and_preview(pipeline_run):
    show = ["features", "show", "features", "clip-pretrained", "--root"]
    result = CliRunner().invoke(app, [*show, str(pipeline_run.parent)])
    assert result.exit_code == 1 and "does not exist" in result.output
    result = CliRunner().invoke(app, [*show, str(pipeline_run)])
    assert result.exit_code == 0, result.output
    assert "weights_sha256" in result.output and "item_id" in result.output


def test_unknown_param_key_fails_naming_it(tmp_path):
    p = tiny_params(tmp_path, preprocess={"cor": 5})
    result = CliRunner().invoke(
        app, ["preprocess", "--raw", tmp_path, "--out", tmp_path / "o", "--params", p]
    )
    assert result.exit_code == 1
    assert "preprocess.cor" in result.output and "allowed in preprocess" in result.output


def test_help_lists_every_stage():
    result = CliRunner().invoke(app, ["--help"])
    for command in (
        "download",
        "preprocess",
        "weights",
        "extract",
        "train",
        "report",
        "stats",
        "features",
    ):
        assert command in result.output


def test_three_feature_sets_from_their_own_weights(pipeline_run, tmp_path):
    dims = {}
    for feature_set in ("cnn_st", "clip-pretrained", "clip-finetuned"):
        feats = pl.read_parquet(pipeline_run / "features" / feature_set / "items.parquet")
        dims[feature_set] = (feats.schema["image"].size, feats.schema["text"].size)
        meta = pq.read_schema(pipeline_run / "features" / feature_set / "items.parquet").metadata
        assert json.loads(meta[b"feature_set"]) == feature_set
    assert dims["cnn_st"][1] == 384  # all-MiniLM-L6-v2
    assert dims["clip-pretrained"] == dims["clip-finetuned"] == (128, 128)
    tuned = json.loads((pipeline_run / "finetune.json").read_text())
    assert tuned["pretrained"] == "demo+finetuned:demo" and tuned["epochs_run"] == 2
    assert set(tuned["before"]) == set(tuned["after"]) >= {"i2t_r1", "i2t_r10"}

    # a feature set's name must match the weights it is made from
    result = CliRunner().invoke(
        app,
        [
            "extract", "--feature-set", "clip-finetuned",
            "--items", str(pipeline_run / "processed/items.parquet"),
            "--weights", str(pipeline_run / "weights/clip-pretrained"),
            "--out", str(tmp_path / "x"), "--params", str(tiny_params(tmp_path)),
        ],
    )  # fmt: skip
    assert result.exit_code == 1 and "holds the weights of feature set 'clip-pretrained'" in (
        result.output
    )
    assert not (tmp_path / "x").exists()


def test_a_model_s_own_train_settings_override_the_shared_ones(pipeline_run, tmp_path):
    p = tiny_params(tmp_path)
    params = yaml.safe_load(p.read_text())
    params["recommenders"]["bpr"]["train"] = {"max_epochs": 1, "patience": 0}
    p.write_text(yaml.safe_dump(params))
    inter = pipeline_run / "processed" / "interactions.parquet"
    out = tmp_path / "bpr"
    args = ["train", "--model", "bpr", "--feature-set", "id", "--interactions", inter]
    invoke(*args, "--out", out, "--params", p)
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 1  # train.max_epochs: 3
    params["recommenders"]["bpr"]["train"] = 2048
    p.write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(app, [*args, "--out", out, "--params", p])
    assert result.exit_code == 1 and "recommenders.bpr.train should be a mapping" in result.output


def test_the_command_keeps_exit_codes_and_output_when_it_skips_teardown(tmp_path):
    # `lmmrec` (stages.cli:main) ends with os._exit: what it prints and its exit status must
    # come through as typer gives them
    run = [str(Path(sys.executable).parent / "lmmrec")]  # the installed console script
    ok = subprocess.run([*run, "--help"], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0 and "Usage: lmmrec" in ok.stdout
    bad = [*run, "stats", "demo", "--processed", str(tmp_path / "none")]
    failed = subprocess.run(bad, cwd=ROOT, capture_output=True, text=True)
    assert failed.returncode == 1 and "error:" in failed.stderr
    usage = subprocess.run([*run, "--bogus"], cwd=ROOT, capture_output=True, text=True)
    assert usage.returncode == 2 and "No such option" in usage.stderr
