"""The one trainer: BPR batches, Adam, early stopping on validation, one test evaluation.

Follows MMRec's ``common/trainer.py``: Adam (no weight decay, no learning-rate decay: its
default scheduler factor is 1.0), one sampled negative per train pair per epoch, the
validation metric checked every ``eval_every`` epochs, training stops once it has failed to
beat the best value ``patience`` + 1 times in a row (MMRec's ``early_stopping``:
``cur_step > stopping_step``), but not before ``min_epochs`` (default 0, as MMRec). Unlike
MMRec, the test split is scored once, with the weights of the best validation epoch, instead
of at every evaluation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import pickle
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.core.atomic import atomic_path, replaced_folder, write_json
from pipeline.core.code import ROOT, code_files
from pipeline.core.distributed import World, resolve_device, sum_gradients, sum_scalar
from pipeline.core.seeding import seed_everything
from pipeline.data.interactions import InteractionData, load_interactions
from pipeline.features.names import ID_ONLY
from pipeline.recommenders import get_recommender
from pipeline.recommenders.base import ItemFeatures, Recommender
from pipeline.training.curves import CURVES_DIR, write_curves
from pipeline.training.evaluation import METRICS, EvalResult, check_topk, evaluate
from pipeline.training.optimizer import FusedAdam
from pipeline.training.sampling import epoch_batches

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
PER_USER_FILE = "per_user.parquet"
MODEL_FILE = "model.pt"
OUTPUTS = (METRICS_FILE, PER_USER_FILE, MODEL_FILE, CURVES_DIR)  # what ``train`` writes
# seconds of training between checkpoints: an interruption redoes at most this much, and a
# short run's epochs (~0.1-0.5 s in the demo) no longer pay ~30 ms each for a checkpoint
CHECKPOINT_INTERVAL_S = 10.0


@dataclass(frozen=True)
class TrainConfig:
    """Training and model-selection settings (defaults: the LMM4Rec authors' MMRec config)."""

    lr: float = 1e-3  # Adam learning rate
    batch_size: int = 2048  # (user, pos, neg) triples per step
    grad_accum: int = 1  # micro-batches per step (under torchrun the processes share them)
    max_epochs: int = 1000
    patience: int = 8  # evaluations without gain on valid_metric tolerated before stopping
    min_epochs: int = 0  # no early stop before this epoch: an early dip does not end a run
    eval_every: int = 1  # epochs between validation evaluations (the last epoch always is one)
    seed: int = 2022  # initialisation (via train_recommender) and negative sampling
    topk: tuple[int, ...] = (10, 20, 50)
    valid_metric: str = "recall@20"  # <metric>@<k> that selects the epoch
    eval_batch_size: int = 4096  # users scored at once
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "max_epochs", "eval_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)}; use at least 1")
        for name in ("patience", "min_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} = {getattr(self, name)}; use a value >= 0")
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


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


def micro_batches(n: int, cfg: TrainConfig, world: World) -> list[slice]:
    """This process's micro-batches of a batch of ``n`` triples, as slices (views rather than
    copies of the batch): the batch is cut into ``grad_accum`` near-equal parts (as
    ``tensor_split`` cuts) and the processes take contiguous shares of them, so the parts,
    hence the results, do not depend on the number of processes."""
    size, extra = divmod(n, cfg.grad_accum)
    starts = [i * size + min(i, extra) for i in range(cfg.grad_accum + 1)]
    parts = [slice(a, b) for a, b in pairwise(starts)]
    return [p for p in parts[world.shard(cfg.grad_accum)] if p.stop > p.start]


def make_optimizer(model: Recommender, lr: float) -> FusedAdam:
    """Adam over the model's ``param_groups``, as one fused kernel per parameter: the same
    update as the default (for-each) Adam, every row of every parameter with a gradient,
    in one pass over its memory instead of about seven (differs in the last float bits)."""
    return FusedAdam(model.param_groups(lr), lr=lr)


def train_step(
    model: Recommender,
    optimizer: FusedAdam,
    users: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    cfg: TrainConfig | None = None,
    device: torch.device | None = None,
    world: World | None = None,
) -> torch.Tensor:
    """One optimiser step on a batch; returns this process's (detached) share of the loss.

    With several micro-batches (``cfg.grad_accum``) each one's loss is weighted by its share
    of the batch and the gradients are summed (over the processes too), so a step sees the
    gradient of the size-weighted mean loss."""
    cfg, world = cfg or TrainConfig(grad_accum=1), world or World()
    device = device or users.device
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=device)
    for part in micro_batches(len(users), cfg, world):
        loss = model.loss(users[part].to(device), pos[part].to(device), neg[part].to(device))
        share = (part.stop - part.start) / len(users)
        if share < 1:
            loss = loss * share
        loss.backward()
        total += loss.detach()
    sum_gradients([p for group in optimizer.param_groups for p in group["params"]], world)
    optimizer.step()
    model.after_step()
    return total


def _train_epoch(
    model: Recommender,
    optimizer: FusedAdam,
    data: InteractionData,
    cfg: TrainConfig,
    epoch: int,
    device: torch.device,
    world: World,
) -> float:
    """One pass over the train pairs (``train_step`` on every batch); returns the mean batch
    loss."""
    model.train()
    total = torch.zeros((), device=device)
    n_batches = 0
    for users, pos, neg in epoch_batches(data, cfg.batch_size, cfg.seed, epoch):
        total += train_step(model, optimizer, users, pos, neg, cfg, device, world)
        n_batches += 1
    mean = (sum_scalar(total, world) / n_batches).item()
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


def _stops(progress: _Progress, cfg: TrainConfig) -> bool:
    """Early stopping: more than ``patience`` evaluations without gain, from ``min_epochs``."""
    return progress.stale > cfg.patience and progress.epoch >= cfg.min_epochs


@dataclass
class _Progress:
    """Where a run stands after its last completed epoch: what a checkpoint carries."""

    epoch: int = 0  # epochs completed
    best: float = -math.inf  # best validation value so far
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None  # weights of best_epoch, on cpu
    stale: int = 0  # evaluations in a row without gain
    seconds: float = 0.0  # wall-clock spent by earlier, interrupted processes
    history: list[dict[str, float]] = field(default_factory=list)  # curve rows, one an epoch


def _digest(arrays: Iterable[np.ndarray | torch.Tensor]) -> str:
    """A short hash of the shapes, dtypes and bytes of ``arrays`` (tensors of any layout)."""
    h = hashlib.blake2b(digest_size=16)
    for array in arrays:
        h.update(f"{tuple(array.shape)}{array.dtype}".encode())
        if isinstance(array, torch.Tensor):
            array = array.detach().cpu()
            if array.layout != torch.strided:
                sparse = array.to_sparse_coo().coalesce()
                h.update(_digest([sparse.indices(), sparse.values()]).encode())
                continue
            array = array.contiguous().reshape(-1).view(torch.uint8).numpy()
        h.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    return h.hexdigest()


def _config_fields(config: Any) -> dict[str, Any]:
    """A config as {field: value} for comparison (tuples as lists); repr if no dataclass."""
    if not dataclasses.is_dataclass(config):
        return {"repr": repr(config)}
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()
    }


def _code_digest(model: Recommender) -> str:
    """Hash of the project files the run executes (``code_files``): this trainer's and, as
    the registry looked them up, the modules of the model and its parts (an end-to-end
    model's recommender and encoder), with what they import."""
    own = sorted({type(m).__module__ for m in model.modules()})
    files = code_files(__name__, *(name for name in own if name.startswith("pipeline.")))
    paths = [p for f in files for p in ([f] if (ROOT / f).is_file() else _folder_files(ROOT / f))]
    h = hashlib.blake2b(digest_size=16)
    for path in paths:
        h.update(f"{path}\0".encode())
        h.update((ROOT / path).read_bytes())
    return h.hexdigest()


def _folder_files(folder: Path) -> list[Path]:
    """The files under ``folder``, sorted, relative to the project root."""
    return sorted(p.relative_to(ROOT) for p in folder.rglob("*") if p.is_file())


def run_fingerprint(
    model: Recommender, data: InteractionData, cfg: TrainConfig, device: torch.device
) -> dict:
    """What a checkpoint must match to be resumed: the model's name, config and code, the
    training config and device, the interactions and the untrained model's named tensors
    (which cover its item features and initialisation)."""
    matrices = [data.train, data.valid, data.test]
    named = [*model.named_parameters(), *model.named_buffers()]
    names = np.frombuffer(" ".join(name for name, _ in named).encode(), dtype=np.uint8)
    return {
        "model": model.name,
        "model_config": _config_fields(model.config),
        "train_config": _config_fields(cfg),
        "device": device.type,
        "data": f"{data.n_users}x{data.n_items}:"
        + _digest(a for m in matrices for a in (m.indptr, m.indices)),
        "model_tensors": _digest([names, *(tensor for _, tensor in named)]),
        "code": _code_digest(model),
    }


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf where two fingerprints disagree."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            d
            for k in sorted(set(old) | set(new))
            for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")
        ]
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def _rng_state() -> dict[str, Any]:
    """The global Python, NumPy and torch generators (models may draw from them)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    name, keys, pos, has_gauss, cached = state["numpy"]
    random.setstate(state["python"])
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(
    path: Path,
    fingerprint: dict,
    progress: _Progress,
    model: Recommender,
    optimizer: FusedAdam,
) -> None:
    """Write everything needed to continue the run after this epoch, atomically."""
    checkpoint = {
        "fingerprint": fingerprint,
        "progress": dataclasses.asdict(progress),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": _rng_state(),
    }
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def _load_checkpoint(path: Path, fingerprint: dict) -> dict | None:
    """The checkpoint at ``path`` if it was written by this very run, else None (warned)."""
    if not path.exists():
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as exc:
        log.warning("checkpoint %s is unreadable (%s): training from scratch", path, exc)
        return None
    differences = _differences(checkpoint.get("fingerprint"), fingerprint)
    if differences:
        log.warning(
            "checkpoint %s belongs to another run (%s): ignoring it, training from scratch",
            path,
            "; ".join(differences),
        )
        return None
    return checkpoint


def train(
    model: Recommender,
    data: InteractionData,
    cfg: TrainConfig,
    out_dir: str | Path,
    checkpoint_path: str | Path | None = None,
    world: World | None = None,
    extra_outputs: Mapping[str, Callable[[Path], None]] | None = None,
) -> dict[str, Any]:
    """Train ``model`` with early stopping on validation, test the best epoch once, and write
    ``metrics.json``, ``per_user.parquet``, ``model.pt`` and the curves (``dvclive/``) as
    ``out_dir``.

    Everything is written into a temporary sibling folder that replaces ``out_dir`` as a whole
    once the run has succeeded (``replaced_folder``): a run that fails (a NaN loss, an
    interruption) leaves ``out_dir`` as it was, or absent. ``extra_outputs`` maps further entry
    names to functions called with their path in that folder after the trainer's own files
    (e2e's encoder), so they are replaced together.

    With ``checkpoint_path``, the state of the run (weights, optimizer, random generators,
    early-stopping counters, the curve rows) is saved there after an evaluation once
    ``CHECKPOINT_INTERVAL_S`` seconds have passed since the run began or was last saved, and a
    run that finds a checkpoint of the same model, configs, code, data and initial tensors
    there continues from it, with the result of an uninterrupted run (a checkpoint of another run
    is ignored with a warning and overwritten). The checkpoint is deleted once the outputs
    are in place. Keep it outside ``out_dir``, which a finished run replaces.

    Under torchrun (``world``) every process trains on its micro-batches of each batch (see
    ``micro_batches``), the gradients are summed over the processes and every process
    evaluates; only rank 0 writes the outputs, the checkpoint and the log.

    Returns the metrics written to ``metrics.json``: the test means ("recall@10" ...
    "map@50"), ``valid_<valid_metric>`` of the best epoch, ``best_epoch`` and ``epochs``
    (1-based counts). The outputs hold no wall-clock times, so the same inputs give the same
    bytes; the times are logged (each evaluated epoch's, and the run's total, training +
    evaluations, summed over the processes of a resumed run).
    """
    world = world or World()
    if cfg.grad_accum < world.size:
        raise ValueError(
            f"grad_accum = {cfg.grad_accum} with {world.size} processes: each process needs "
            f"a micro-batch, so use grad_accum >= {world.size} (a multiple keeps them even)"
        )
    extra_outputs = extra_outputs or {}
    checkpoint_path = None if checkpoint_path is None else Path(checkpoint_path)
    names = (*OUTPUTS, *extra_outputs)
    with replaced_folder(out_dir, names, world.is_main) as folder:
        metrics = _fit(model, data, cfg, folder, checkpoint_path, world)
        if world.is_main:
            for name, write in extra_outputs.items():
                write(folder / name)
    if checkpoint_path is not None and world.is_main:
        checkpoint_path.unlink(missing_ok=True)
    return metrics


def _fit(
    model: Recommender,
    data: InteractionData,
    cfg: TrainConfig,
    folder: Path,
    checkpoint_path: Path | None,
    world: World,
) -> dict[str, Any]:
    """``train``'s run: the epochs, the test of the best one, and (rank 0) its files written
    into ``folder``."""
    device = world.device(resolve_device(cfg.device))
    seed_everything(cfg.seed)
    fingerprint = None if checkpoint_path is None else run_fingerprint(model, data, cfg, device)
    model.to(device)
    optimizer = make_optimizer(model, cfg.lr)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("training %s (%d parameters) on %s: %s", model.name, n_params, device, cfg)

    progress = _Progress()
    checkpoint = None if checkpoint_path is None else _load_checkpoint(checkpoint_path, fingerprint)
    if checkpoint is not None:
        progress = _Progress(**checkpoint["progress"])
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        _set_rng_state(checkpoint["rng"])
        log.info("resuming %s after epoch %d from %s", model.name, progress.epoch, checkpoint_path)

    started = saved_at = time.perf_counter()
    bar = tqdm(
        total=cfg.max_epochs,
        initial=progress.epoch,
        desc=model.name,
        disable=None if world.is_main else True,
    )
    while progress.epoch < cfg.max_epochs and not _stops(progress, cfg):
        epoch = progress.epoch + 1
        epoch_start = time.perf_counter()
        row = {"loss": _train_epoch(model, optimizer, data, cfg, epoch, device, world)}
        evaluated = epoch % cfg.eval_every == 0 or epoch == cfg.max_epochs
        if evaluated:
            valid = _evaluate(model, data, "valid", cfg, device).means
            value = valid[cfg.valid_metric]
            for k in cfg.topk:
                row[f"valid_recall@{k}"] = valid[f"recall@{k}"]
                row[f"valid_ndcg@{k}"] = valid[f"ndcg@{k}"]
            if value > progress.best:
                progress.best, progress.best_epoch, progress.stale = value, epoch, 0
                progress.best_state = {
                    k: v.detach().cpu().clone() for k, v in model.state_dict().items()
                }
            else:
                progress.stale += 1
            log.info(
                "epoch %d: loss %.5f, valid %s %.5f (best %.5f at epoch %d), %.2f s",
                epoch,
                row["loss"],
                cfg.valid_metric,
                value,
                progress.best,
                progress.best_epoch,
                time.perf_counter() - epoch_start,
            )
        progress.history.append(row)
        progress.epoch = epoch
        bar.update()
        now = time.perf_counter()
        due = now - saved_at >= CHECKPOINT_INTERVAL_S
        if evaluated and due and checkpoint_path is not None and world.is_main:
            saved = dataclasses.replace(progress, seconds=progress.seconds + now - started)
            _save_checkpoint(checkpoint_path, fingerprint, saved, model, optimizer)
            saved_at = now
        if _stops(progress, cfg):
            log.info(
                "early stop at epoch %d: no gain for %d evaluations", epoch, progress.stale
            )
    bar.close()

    model.load_state_dict(progress.best_state)
    test = _evaluate(model, data, "test", cfg, device)
    metrics: dict[str, Any] = dict(test.means)
    metrics[f"valid_{cfg.valid_metric}"] = progress.best
    metrics.update(best_epoch=progress.best_epoch, epochs=progress.epoch)
    if not world.is_main:
        return metrics
    log.info(
        "%s trained and tested in %.2f s (epochs: %d)",
        model.name, progress.seconds + time.perf_counter() - started, progress.epoch,
    )  # fmt: skip
    write_curves(folder, progress.history)
    test.write_parquet(folder / PER_USER_FILE)
    with atomic_path(folder / MODEL_FILE) as tmp:  # torch.save names its archive after tmp
        torch.save(model.saved_state(progress.best_state), tmp)
    write_json(folder / METRICS_FILE, metrics)
    log.info("%s test: %s", model.name, {k: round(v, 5) for k, v in test.means.items()})
    return metrics


def train_recommender(
    name: str,
    data: InteractionData,
    features: ItemFeatures | None,
    model_config: Mapping[str, Any] | Any | None,
    cfg: TrainConfig,
    out_dir: str | Path,
    checkpoint_path: str | Path | None = None,
) -> dict[str, Any]:
    """Seed, build the registered recommender ``name`` and ``train`` it (what the stage runs);
    ``checkpoint_path`` makes the run resumable (see ``train``).

    Runs under ``deterministic()``.
    """
    with deterministic():
        seed_everything(cfg.seed)
        model = get_recommender(name).build(data, features, model_config)
        return train(model, data, cfg, out_dir, checkpoint_path)


def load_item_features(features: str | Path, n_items: int) -> ItemFeatures:
    """The feature store in ``features`` as a recommender's item features; its items must be
    the interactions' 0..``n_items``-1."""
    from pipeline.features.store import read_feature_store  # faiss: for feature models only

    store = read_feature_store(features, n_items)
    return ItemFeatures.from_arrays(store.item_ids, store.image, store.text, n_items)


def train_from_files(
    name: str,
    feature_set: str,
    interactions: str | Path,
    features: str | Path | None,
    model_config: Mapping[str, Any] | Any | None,
    cfg: TrainConfig,
    out_dir: str | Path,
    checkpoint_path: str | Path | None = None,
) -> dict[str, Any]:
    """The train stage's run: ``train_recommender`` on the interactions file and, for a model
    that reads item features, the feature store ``features`` of ``feature_set`` (``id`` for
    an ID-only model)."""
    model_cls = get_recommender(name)
    data = load_interactions(interactions)
    item_features = None
    if model_cls.uses_features:
        if feature_set == ID_ONLY or features is None:
            raise ValueError(f"{name} reads item features: give --feature-set and --features")
        item_features = load_item_features(features, data.n_items)
    elif feature_set != ID_ONLY:
        raise ValueError(f"{name} is ID-only: train it with --feature-set {ID_ONLY}")
    metrics = train_recommender(name, data, item_features, model_config, cfg, out_dir,
                                checkpoint_path)  # fmt: skip
    log.info("%s on %s: %s", name, feature_set, metrics)
    return metrics


@contextmanager
def deterministic() -> Iterator[None]:
    """Torch's deterministic algorithms (warn-only where none exists) inside the block:
    multithreaded CPU gradient accumulation otherwise made LATTICE's metrics differ between
    identical runs.

    Sets the flag through ``torch._C`` rather than ``torch.use_deterministic_algorithms``,
    which also sets torch.compile's (inductor's) flag and so imports the compiler, ~1.2 s a
    process; nothing here is compiled. Leaves fresh buffers unfilled (the mode's default
    fills each with NaN, a debugging aid: ~10% of an SLMRec step at Baby size); no result
    reads memory it did not write."""
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch._C._get_deterministic_fill_uninitialized_memory(),
    )
    torch._C._set_deterministic_algorithms(True, warn_only=True)
    torch._C._set_deterministic_fill_uninitialized_memory(False)
    try:
        yield
    finally:
        torch._C._set_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch._C._set_deterministic_fill_uninitialized_memory(previous[2])
