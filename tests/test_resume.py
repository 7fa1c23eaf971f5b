"""Resumable training: an interrupted run continued from its checkpoint ends exactly where an
uninterrupted one does; checkpoints of other runs are ignored with a warning."""

import json
import random
from dataclasses import dataclass, replace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

import pipeline.training.trainer as training
from pipeline.data.interactions import InteractionData
from pipeline.recommenders import ItemFeatures, Recommender, list_recommenders
from pipeline.training.trainer import TrainConfig, train, train_recommender

CFG = TrainConfig(
    lr=0.02,
    batch_size=64,
    max_epochs=8,
    patience=2,
    topk=(5, 10, 20),
    valid_metric="ndcg@5",
    device="cpu",
)


class Interrupted(Exception):
    """Stands for a killed process."""


@pytest.fixture(autouse=True)
def _checkpoint_every_evaluation(monkeypatch):
    """These runs take milliseconds an epoch: save at every evaluation, as a slow run does."""
    monkeypatch.setattr(training, "CHECKPOINT_INTERVAL_S", 0.0)


@pytest.fixture(scope="module")
def data() -> InteractionData:
    """60 users in 3 taste groups over 45 items: 8 interactions each, 6 train / 1 / 1."""
    rng = np.random.default_rng(1)
    users, items, splits = [], [], []
    for u in range(60):
        users += [u] * 8
        items += rng.choice(np.arange(u % 3, 45, 3), 8, replace=False).tolist()
        splits += ["train"] * 6 + ["valid", "test"]
    return InteractionData.from_arrays(users, items, splits, 60, 45)


@pytest.fixture(scope="module")
def features(data) -> ItemFeatures:
    groups = torch.arange(data.n_items) % 3
    text = torch.linspace(0, 1, data.n_items)[:, None].repeat(1, 2)
    return ItemFeatures(image=nn.functional.one_hot(groups, 3).float(), text=text)


@dataclass(frozen=True)
class NoisyConfig:
    embedding_size: int = 8


class Noisy(Recommender):
    """Matrix factorisation whose loss draws from torch's, NumPy's and Python's global
    generators (dropout-like noise), so resuming must restore all three."""

    config_class = NoisyConfig
    name = "noisy"

    def __init__(self, data, features, config):
        super().__init__(data, features, config)
        self.users = nn.Embedding(self.n_users, config.embedding_size)
        self.items = nn.Embedding(self.n_items, config.embedding_size)

    def loss(self, users, pos, neg):
        u = nn.functional.dropout(self.users(users), 0.3)
        scale = float(np.random.uniform(0.5, 1.5)) * random.uniform(0.5, 1.5)
        diff = (u * (self.items(pos) - self.items(neg))).sum(dim=1)
        return -nn.functional.logsigmoid(scale * diff).mean()

    def score(self, users):
        return self.users(users) @ self.items.weight.T


def interrupt_after(monkeypatch, epoch: int) -> None:
    """Make the trainer die when it starts epoch ``epoch + 1``."""
    original = training._train_epoch

    def train_epoch(model, optimizer, data, cfg, current, *rest):
        if current == epoch + 1:
            raise Interrupted
        return original(model, optimizer, data, cfg, current, *rest)

    monkeypatch.setattr(training, "_train_epoch", train_epoch)


def outputs(out) -> dict:
    """Everything a run writes."""
    plots = out / "dvclive" / "plots" / "metrics"
    return {
        "metrics": json.loads((out / "metrics.json").read_text()),
        "per_user": pq.read_table(out / "per_user.parquet").to_pydict(),
        "model": {k: v.tolist() for k, v in torch.load(out / "model.pt").items()},
        "plots": {p.name: p.read_text() for p in plots.glob("*.tsv")},
    }


def run_model(name, data, features, cfg, out, checkpoint=None):
    if name == "noisy":
        torch.manual_seed(cfg.seed)
        return train(Noisy.build(data, None, {}), data, cfg, out, checkpoint)
    return train_recommender(name, data, features, {"embedding_size": 8}, cfg, out, checkpoint)


@pytest.mark.parametrize(
    "name, eval_every, stop_after",
    [("noisy", 1, 3), ("noisy", 2, 3), ("bpr", 1, 2), ("vbpr", 3, 4)],
)
def test_resumed_run_equals_uninterrupted(
    name, eval_every, stop_after, data, features, tmp_path, monkeypatch
):
    cfg = replace(CFG, eval_every=eval_every)
    run_model(name, data, features, cfg, tmp_path / "whole")
    checkpoint = tmp_path / "ckpt" / "run.pt"

    with monkeypatch.context() as patch:
        interrupt_after(patch, stop_after)
        with pytest.raises(Interrupted):
            run_model(name, data, features, cfg, tmp_path / "resumed", checkpoint)
    saved = torch.load(checkpoint, weights_only=True)["progress"]
    assert saved["epoch"] == stop_after - stop_after % eval_every  # the last evaluated epoch
    assert len(saved["history"]) == saved["epoch"]

    assert not (tmp_path / "resumed").exists()  # an interrupted run leaves no partial outputs
    metrics = run_model(name, data, features, cfg, tmp_path / "resumed", checkpoint)
    assert outputs(tmp_path / "resumed") == outputs(tmp_path / "whole")
    assert metrics["epochs"] > stop_after
    assert not checkpoint.exists()  # removed after a successful finish


def test_checkpoints_wait_for_the_interval(data, tmp_path, monkeypatch):
    # within the interval nothing is saved: an interruption then starts the run afresh
    monkeypatch.setattr(training, "CHECKPOINT_INTERVAL_S", 3600.0)
    checkpoint = tmp_path / "run.pt"
    with monkeypatch.context() as patch:
        interrupt_after(patch, 3)
        with pytest.raises(Interrupted):
            run_model("bpr", data, None, CFG, tmp_path / "out", checkpoint)
    assert not checkpoint.exists()


@pytest.mark.parametrize("name", list_recommenders())
def test_every_registered_model_resumes_exactly(name, data, features, tmp_path, monkeypatch):
    """The contract for model authors: all state that training changes lives in the
    state_dict (parameters, persistent buffers) or the global generators."""
    cfg = replace(CFG, max_epochs=2, patience=10)
    run_model(name, data, features, cfg, tmp_path / "whole")
    checkpoint = tmp_path / "run.pt"
    with monkeypatch.context() as patch:
        interrupt_after(patch, 1)
        with pytest.raises(Interrupted):
            run_model(name, data, features, cfg, tmp_path / "resumed", checkpoint)
    run_model(name, data, features, cfg, tmp_path / "resumed", checkpoint)
    assert outputs(tmp_path / "resumed") == outputs(tmp_path / "whole")


def test_checkpoint_of_another_run_is_ignored_with_a_warning(
    data, features, tmp_path, monkeypatch, caplog
):
    checkpoint = tmp_path / "run.pt"
    with monkeypatch.context() as patch:
        interrupt_after(patch, 2)
        with pytest.raises(Interrupted):
            run_model("vbpr", data, features, CFG, tmp_path / "old", checkpoint)

    other = replace(CFG, lr=0.01)
    run_model("vbpr", data, features, other, tmp_path / "fresh")
    run_model("vbpr", data, features, other, tmp_path / "new", checkpoint)
    assert "belongs to another run (train_config.lr: 0.02 -> 0.01)" in caplog.text
    assert outputs(tmp_path / "new") == outputs(tmp_path / "fresh")

    with monkeypatch.context() as patch:
        interrupt_after(patch, 2)
        with pytest.raises(Interrupted):
            run_model("vbpr", data, features, CFG, tmp_path / "old", checkpoint)
    changed = ItemFeatures(image=features.image.flip(0), text=features.text)
    caplog.clear()
    run_model("vbpr", data, changed, CFG, tmp_path / "changed", checkpoint)
    assert "belongs to another run (model_tensors: " in caplog.text  # new item features


def test_unreadable_checkpoint_is_ignored(data, tmp_path, caplog):
    checkpoint = tmp_path / "run.pt"
    checkpoint.write_bytes(b"not a checkpoint")
    metrics = run_model("bpr", data, None, CFG, tmp_path / "out", checkpoint)
    assert "is unreadable" in caplog.text
    assert metrics["epochs"] >= 1 and not checkpoint.exists()


def test_no_checkpoint_path_writes_no_checkpoint(data, tmp_path):
    run_model("bpr", data, None, replace(CFG, max_epochs=2), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.rglob("*.pt")) == ["model.pt"]
