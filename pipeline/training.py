"""The one trainer: BPR batches, Adam, early stopping on validation, one test evaluation.

Follows MMRec's ``common/trainer.py``: Adam (no weight decay, no learning-rate decay: its
default scheduler factor is 1.0), one sampled negative per train pair per epoch, the
validation metric checked every ``eval_every`` epochs, training stops once it has failed to
beat the best value ``patience`` + 1 times in a row (MMRec's ``early_stopping``:
``cur_step > stopping_step``). Unlike MMRec, the test split is scored once, with the weights
of the best validation epoch, instead of at every evaluation.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from dvclive import Live
from scmrepo.exceptions import SCMError
from tqdm import tqdm

from pipeline.atomic import atomic_path, write_json
from pipeline.evaluation import METRICS, EvalResult, check_topk, evaluate
from pipeline.interactions import InteractionData
from pipeline.recommenders import get_recommender
from pipeline.recommenders.base import ItemFeatures, Recommender
from pipeline.sampling import epoch_batches
from pipeline.seeding import seed_everything

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
PER_USER_FILE = "per_user.parquet"
MODEL_FILE = "model.pt"
DVCLIVE_DIR = "dvclive"


@dataclass(frozen=True)
class TrainConfig:
    """Training and model-selection settings (defaults: the LMM4Rec authors' MMRec config)."""

    lr: float = 1e-3  # Adam learning rate
    batch_size: int = 2048  # (user, pos, neg) triples per step
    max_epochs: int = 1000
    patience: int = 8  # evaluations without gain on valid_metric tolerated before stopping
    eval_every: int = 1  # epochs between validation evaluations (the last epoch always is one)
    seed: int = 2022  # initialisation (via train_recommender) and negative sampling
    topk: tuple[int, ...] = (10, 20, 50)
    valid_metric: str = "recall@20"  # <metric>@<k> that selects the epoch
    eval_batch_size: int = 4096  # users scored at once
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_epochs", "eval_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)}; use at least 1")
        if self.patience < 0:
            raise ValueError(f"patience = {self.patience}; use a value >= 0")
        if not self.lr > 0:
            raise ValueError(f"lr = {self.lr}; use a positive learning rate")
        ks = check_topk(self.topk)
        allowed = [f"{m}@{k}" for m in METRICS for k in ks]
        if self.valid_metric not in allowed:
            raise ValueError(f"valid_metric = {self.valid_metric!r}; allowed: {allowed}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError as exc:
                raise ValueError(
                    f"device = {self.device!r}; use auto, cpu, cuda or cuda:N"
                ) from exc


class _NoLive:
    """Stands in for dvclive's Live when it cannot start; drops what is logged."""

    def __enter__(self) -> _NoLive:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def log_metric(self, name: str, value: float) -> None:
        return None

    def next_step(self) -> None:
        return None


def open_live(directory: Path) -> Live | _NoLive:
    """A dvclive logger writing ``directory`` only: no experiment saved, no dvc.yaml written.

    Live's DVC probe fails inside a git repository without commits (scmrepo's "Empty git
    repo"); training then goes on without the per-epoch plots, with a warning.
    """
    try:
        return Live(dir=str(directory), save_dvc_exp=False, dvcyaml=None, report=None)
    except SCMError as exc:
        log.warning("dvclive unavailable (%s): per-epoch plots are not written", exc)
        return _NoLive()


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; any other name as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _train_epoch(
    model: Recommender,
    optimizer: torch.optim.Optimizer,
    data: InteractionData,
    cfg: TrainConfig,
    epoch: int,
    device: torch.device,
) -> float:
    """One pass over the train pairs; returns the mean batch loss."""
    model.train()
    total = torch.zeros((), device=device)
    n_batches = 0
    for users, pos, neg in epoch_batches(data, cfg.batch_size, cfg.seed, epoch):
        loss = model.loss(users.to(device), pos.to(device), neg.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
        n_batches += 1
    mean = (total / n_batches).item()
    if not math.isfinite(mean):
        raise NonFiniteLossError(
            f"{model.name}: training loss is {mean} at epoch {epoch} (lr={cfg.lr}, "
            f"config {model.config}); lower the learning rate or check the item features"
        )
    return mean


def _evaluate(
    model: Recommender, data: InteractionData, split: str, cfg: TrainConfig, device: torch.device
) -> EvalResult:
    model.eval()
    return evaluate(
        lambda users: model.score(users.to(device)), data, split, cfg.topk, cfg.eval_batch_size
    )


def train(
    model: Recommender, data: InteractionData, cfg: TrainConfig, out_dir: str | Path
) -> dict[str, Any]:
    """Train ``model`` with early stopping on validation, test the best epoch once, and write
    ``metrics.json``, ``per_user.parquet``, ``model.pt`` (atomically) and a dvclive log.

    Returns the metrics written to ``metrics.json``: the test means ("recall@10" ...
    "map@50"), ``valid_<valid_metric>`` of the best epoch, ``best_epoch`` and ``epochs``
    (1-based counts) and ``seconds`` (wall-clock, training + evaluations).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("training %s (%d parameters) on %s: %s", model.name, n_params, device, cfg)

    started = time.perf_counter()
    best, best_epoch, best_state, stale, epoch = -math.inf, 0, None, 0, 0
    with open_live(out_dir / DVCLIVE_DIR) as live:
        for epoch in tqdm(range(1, cfg.max_epochs + 1), desc=model.name, disable=None):
            epoch_start = time.perf_counter()
            loss = _train_epoch(model, optimizer, data, cfg, epoch, device)
            live.log_metric("loss", loss)
            if epoch % cfg.eval_every == 0 or epoch == cfg.max_epochs:
                valid = _evaluate(model, data, "valid", cfg, device).means
                value = valid[cfg.valid_metric]
                for k in cfg.topk:
                    live.log_metric(f"valid_recall@{k}", valid[f"recall@{k}"])
                    live.log_metric(f"valid_ndcg@{k}", valid[f"ndcg@{k}"])
                if value > best:
                    best, best_epoch, stale = value, epoch, 0
                    best_state = {
                        k: v.detach().cpu().clone() for k, v in model.state_dict().items()
                    }
                else:
                    stale += 1
                log.info(
                    "epoch %d: loss %.5f, valid %s %.5f (best %.5f at epoch %d)",
                    epoch,
                    loss,
                    cfg.valid_metric,
                    value,
                    best,
                    best_epoch,
                )
            live.log_metric("epoch_seconds", time.perf_counter() - epoch_start)
            live.next_step()
            if stale > cfg.patience:
                log.info("early stop at epoch %d: no gain for %d evaluations", epoch, stale)
                break

    model.load_state_dict(best_state)
    test = _evaluate(model, data, "test", cfg, device)
    metrics: dict[str, Any] = dict(test.means)
    metrics[f"valid_{cfg.valid_metric}"] = best
    metrics.update(best_epoch=best_epoch, epochs=epoch, seconds=time.perf_counter() - started)
    test.write_parquet(out_dir / PER_USER_FILE)
    with atomic_path(out_dir / MODEL_FILE) as tmp:
        torch.save(best_state, tmp)
    write_json(out_dir / METRICS_FILE, metrics)
    log.info("%s test: %s", model.name, {k: round(v, 5) for k, v in test.means.items()})
    return metrics


def train_recommender(
    name: str,
    data: InteractionData,
    features: ItemFeatures | None,
    model_config: Mapping[str, Any] | Any | None,
    cfg: TrainConfig,
    out_dir: str | Path,
) -> dict[str, Any]:
    """Seed, build the registered recommender ``name`` and ``train`` it (what the stage runs)."""
    seed_everything(cfg.seed)
    model = get_recommender(name).build(data, features, model_config)
    return train(model, data, cfg, out_dir)
