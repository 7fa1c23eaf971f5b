"""The trainer: outputs (replaced whole or not at all), determinism, early stopping, NaN detection,
config checks."""

import json
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_same_bytes import assert_same_bytes
from torch import nn

import pipeline.training.trainer as training
from pipeline.data.interactions import InteractionData
from pipeline.recommenders import ItemFeatures, Recommender, get_recommender
from pipeline.training.baselines import evaluate_baseline
from pipeline.training.evaluation import metric_names
from pipeline.training.trainer import NonFiniteLossError, TrainConfig, train, train_recommender

TOPK = (5, 10, 20)
FAST = TrainConfig(lr=0.02, batch_size=64, max_epochs=6, patience=2, topk=TOPK, device="cpu")


@pytest.fixture(scope="module")
def data() -> InteractionData:
    """80 users in 4 taste groups over 60 items: 8 interactions each, 6 train / 1 / 1."""
    rng = np.random.default_rng(0)
    users, items, splits = [], [], []
    for u in range(80):
        chosen = rng.choice(np.arange(u % 4, 60, 4), 8, replace=False)
        users += [u] * 8
        items += chosen.tolist()
        splits += ["train"] * 6 + ["valid", "test"]
    return InteractionData.from_arrays(users, items, splits, 80, 60)


@pytest.fixture(scope="module")
def features(data) -> ItemFeatures:
    groups = torch.arange(data.n_items) % 4
    return ItemFeatures(image=nn.functional.one_hot(groups, 4).float(), text=torch.ones(60, 2))


@pytest.mark.parametrize("name", ["bpr", "vbpr"])
def test_outputs_are_complete_consistent_and_deterministic(name, data, features, tmp_path):
    runs = [
        train_recommender(name, data, features, {"embedding_size": 8}, FAST, tmp_path / f"r{i}")
        for i in range(2)
    ]
    # same seed, same CPU: the same bytes in every output (no wall-clock time), so DVC sees
    # no change
    assert_same_bytes(tmp_path / "r0", tmp_path / "r1")
    assert runs[0] == runs[1]

    out = tmp_path / "r0"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == runs[0]
    assert set(metrics) == set(metric_names(TOPK)) | {"valid_recall@20", "best_epoch", "epochs"}
    assert 1 <= metrics["best_epoch"] <= metrics["epochs"] <= FAST.max_epochs

    per_user = pq.read_table(out / "per_user.parquet")
    assert per_user.column_names == ["user_id", *metric_names(TOPK)]
    assert str(per_user.schema.field("user_id").type) == "int32"
    assert per_user.column("user_id").to_pylist() == data.eval_users("test").tolist()
    for column in metric_names(TOPK):
        assert np.mean(per_user.column(column).to_numpy()) == pytest.approx(metrics[column])

    model = get_recommender(name).build(data, features, {"embedding_size": 8})
    model.load_state_dict(torch.load(out / "model.pt"))
    loss_log = (out / "dvclive" / "plots" / "metrics" / "loss.tsv").read_text().splitlines()
    assert len(loss_log) == metrics["epochs"] + 1  # header + one row per epoch

    chance = evaluate_baseline("random", data, "test", TOPK).means["recall@20"]
    assert metrics["recall@20"] > chance  # it learned the taste groups


@dataclass(frozen=True)
class ConstantConfig:
    loss_value: float = 1.0


class Constant(Recommender):
    """Scores every item 0 (a flat validation curve); its loss is a chosen constant."""

    config_class = ConstantConfig

    def __init__(self, data, features, config):
        super().__init__(data, features, config)
        self.weight = nn.Parameter(torch.ones(1))

    def loss(self, users, pos, neg):
        return (self.weight * 0 + self.config.loss_value).sum()

    def score(self, users):
        return torch.zeros(len(users), self.n_items) + self.weight * 0


@pytest.mark.parametrize(
    "patience, eval_every, max_epochs, min_epochs, epochs",
    [
        (2, 1, 50, 0, 4),  # best at epoch 1, then 3 evaluations without gain > patience 2
        (0, 3, 50, 0, 6),  # evaluations at 3 (best) and 6 (no gain > patience 0)
        (5, 4, 6, 0, 6),  # the last epoch is always evaluated; max_epochs ends it
        (2, 1, 50, 9, 9),  # patience ran out at epoch 4; min_epochs holds the stop to epoch 9
    ],
)
def test_early_stopping_counts_evaluations(
    data, tmp_path, patience, eval_every, max_epochs, min_epochs, epochs
):
    cfg = TrainConfig(
        batch_size=256, max_epochs=max_epochs, patience=patience, eval_every=eval_every,
        min_epochs=min_epochs, topk=TOPK,
    )  # fmt: skip
    metrics = train(Constant.build(data, None, {}), data, cfg, tmp_path)
    assert metrics["epochs"] == epochs
    assert metrics["best_epoch"] == min(eval_every, max_epochs)


def test_non_finite_loss_names_model_and_epoch(data, features, tmp_path):
    broken = ItemFeatures(image=features.image.clone(), text=features.text)
    broken.image[3, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="vbpr: training loss is nan at epoch 1"):
        train_recommender("vbpr", data, broken, {"embedding_size": 8}, FAST, tmp_path)
    with pytest.raises(NonFiniteLossError, match="loss is inf at epoch 1"):
        train(Constant.build(data, None, {"loss_value": float("inf")}), data, FAST, tmp_path)
    assert not (tmp_path / "metrics.json").exists()


class Diverging(Constant):
    """Constant's flat curve, with a loss that turns NaN after two steps (one epoch of 256-pair
    batches here), as a too high learning rate makes it."""

    def loss(self, users, pos, neg):
        self.steps = getattr(self, "steps", 0) + 1
        return (self.weight * 0 + (1.0 if self.steps <= 2 else float("nan"))).sum()


def files_under(folder) -> dict:
    """Every path below ``folder`` (hidden ones too) with its bytes (None for a folder)."""
    return {
        str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
        for p in sorted(folder.rglob("*"))
    }


def test_a_failed_run_leaves_the_folder_as_it_was(data, tmp_path, monkeypatch):
    monkeypatch.setattr(training, "CHECKPOINT_INTERVAL_S", 0.0)  # save at every evaluation
    cfg = TrainConfig(batch_size=256, max_epochs=3, topk=TOPK)
    out = tmp_path / "out"
    train(Constant.build(data, None, {}), data, cfg, out)
    (out / ".gitignore").write_text("/model.pt\n/per_user.parquet\n")  # as DVC writes it
    before = files_under(tmp_path)
    with pytest.raises(NonFiniteLossError, match="loss is nan at epoch 2"):
        train(Diverging.build(data, None, {}), data, cfg, out, tmp_path / "ckpt.pt")
    assert (tmp_path / "ckpt.pt").exists()  # kept for a resume
    (tmp_path / "ckpt.pt").unlink()
    assert files_under(tmp_path) == before  # nothing changed, nothing temporary left

    with pytest.raises(NonFiniteLossError):
        train(Diverging.build(data, None, {}), data, cfg, tmp_path / "new")
    assert files_under(tmp_path) == before  # a failed first run leaves no folder


def test_a_run_replaces_the_folder_as_a_whole(data, tmp_path):
    cfg = TrainConfig(batch_size=256, max_epochs=2, topk=TOPK)
    first, second = tmp_path / "first", tmp_path / "second"
    train(Constant.build(data, None, {}), data, cfg, first)
    (first / ".gitignore").write_text("/model.pt\n")
    train(Constant.build(data, None, {}), data, cfg, second)
    for name in ("model.pt", "per_user.parquet", "dvclive/plots/metrics/loss.tsv"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name

    (first / "dvclive" / "plots" / "metrics" / "old_metric.tsv").write_text("step\told_metric\n")
    shorter = TrainConfig(batch_size=256, max_epochs=1, topk=TOPK)
    train(Constant.build(data, None, {}), data, shorter, first)
    kept = sorted(p.name for p in first.iterdir())
    assert kept == [".gitignore", "dvclive", "metrics.json", "model.pt", "per_user.parquet"]
    # the earlier run's longer curves and stray files went with it; DVC's .gitignore stays
    plots = first / "dvclive" / "plots" / "metrics"
    assert not (plots / "old_metric.tsv").exists()
    assert (plots / "loss.tsv").read_text().splitlines() == ["step\tloss", "0\t1.0"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_folder_holding_other_files_is_refused_before_training(data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    cfg = TrainConfig(batch_size=256, max_epochs=2, topk=TOPK)
    with pytest.raises(FileExistsError, match=r"holds \['notes.txt'\], which this stage"):
        train(Diverging.build(data, None, {}), data, cfg, out)  # refused before its NaN
    assert files_under(tmp_path) == {"out": None, "out/notes.txt": b"mine"}
    with pytest.raises(NotADirectoryError, match="notes.txt is a file or a link"):
        train(Diverging.build(data, None, {}), data, cfg, out / "notes.txt")


def test_curves_are_written_in_dvclive_layout(data, tmp_path):
    """`dvc plots` (dvc.yaml's plots) and the report read these files: one TSV per metric with a
    row for each epoch that logged it, and the latest values with the last step."""
    cfg = TrainConfig(batch_size=256, max_epochs=4, eval_every=2, topk=TOPK)
    train(Constant.build(data, None, {"loss_value": 0.25}), data, cfg, tmp_path)
    plots = tmp_path / "dvclive" / "plots" / "metrics"
    assert (plots / "loss.tsv").read_text() == "step\tloss\n0\t0.25\n1\t0.25\n2\t0.25\n3\t0.25\n"
    recall = (plots / "valid_recall@20.tsv").read_text().splitlines()
    assert recall[0] == "step\tvalid_recall@20"
    assert [row.split("\t")[0] for row in recall[1:]] == ["1", "3"]  # the evaluated epochs
    assert sorted(p.name for p in plots.iterdir()) == sorted(
        ["loss.tsv"] + [f"valid_{m}@{k}.tsv" for k in TOPK for m in ("recall", "ndcg")]
    )
    summary = json.loads((tmp_path / "dvclive" / "metrics.json").read_text())
    assert list(summary)[0] == "loss" and list(summary)[-1] == "step"
    assert summary["step"] == 3 and summary["loss"] == 0.25
    assert summary["valid_recall@20"] == float(recall[-1].split("\t")[1])


def test_bad_names_and_settings_raise(data, tmp_path):
    with pytest.raises(ValueError, match="unknown recommender 'mf'; known: "):
        train_recommender("mf", data, None, {}, FAST, tmp_path)
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['layers'\]"):
        train_recommender("bpr", data, None, {"layers": 2}, FAST, tmp_path)
    with pytest.raises(ValueError, match="valid_metric = 'recall@100'; allowed: "):
        TrainConfig(valid_metric="recall@100")
    with pytest.raises(ValueError, match="patience = -1"):
        TrainConfig(patience=-1)
    with pytest.raises(ValueError, match="device = 'gpu0'"):
        TrainConfig(device="gpu0")
