"""e2e stage: one recommender trained jointly with the params' LMM from raw item images and
texts, starting from the pretrained weights (the feature store is never read)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from pipeline.core.distributed import world
from pipeline.core.seeding import seed_everything
from pipeline.data.interactions import load_interactions
from pipeline.data.prepared import require_raw_items
from pipeline.data.schemas import ITEMS, read_table
from pipeline.encoders import list_encoders, load_encoder, read_card
from pipeline.recommenders import get_recommender
from pipeline.training.e2e import E2EConfig, build_end_to_end, train_end_to_end
from pipeline.training.trainer import deterministic, resolve_device
from stages.finetune import settings as encoder_settings
from stages.params import ParamsError, build, model_settings, require
from stages.train import train_config

log = logging.getLogger(__name__)

OVERRIDES = ("train", "recommenders")  # e2e sub-sections that override the shared sections


def settings(
    params: dict[str, Any], model: str, seed: int | None = None
) -> tuple[E2EConfig, Any, dict[str, Any]]:
    """The e2e config (``e2e`` with the params' encoder's own mapping, e.g. ``e2e.vlmo``, over
    it), the training config (``train``, then ``recommenders.<model>.train``, ``e2e.train`` and
    ``e2e.recommenders.<model>.train`` over it, with the training ``seed``) and the model's
    config (``recommenders.<model>`` overridden by ``e2e.recommenders.<model>``)."""
    section = params.get("e2e") or {}
    if not isinstance(section, dict):
        raise ParamsError(f"params.yaml: e2e should be a mapping, got {section!r}")
    section = encoder_settings(section, require(params, "encoder", list_encoders()))
    cfg = build(E2EConfig, {k: v for k, v in section.items() if k not in OVERRIDES}, "e2e")
    shared, shared_train = model_settings(require(params, "recommenders"), model)
    own, own_train = model_settings(section.get("recommenders"), model, "e2e.recommenders")
    train_cfg = train_config(params, shared_train, section.get("train") or {}, own_train, seed=seed)
    return cfg, train_cfg, {**shared, **own}


def run(
    params: dict[str, Any],
    model: str,
    items: Path,
    interactions: Path,
    weights: Path,
    out: Path,
    checkpoint: Path | None = None,
    init: Path | None = None,
    seed: int | None = None,
) -> dict:
    """Train ``model`` end to end with the encoder in ``weights``; write ``out``. With
    ``e2e.warm_start`` the recommender starts from ``init`` (its run on the pretrained
    features with the same training ``seed``). Under ``torchrun --nproc_per_node N`` the
    processes share each batch and rank 0 writes. A prefix cache too large for memory is
    mapped from a folder next to ``checkpoint`` (else in the system's temporary folder) and
    removed at the end."""
    name = require(params, "encoder", list_encoders())
    table = read_table(items, ITEMS, "items")
    require_raw_items(items, table, f"e2e {model} with {name}")
    card = read_card(weights)
    if card["encoder"] != name:
        raise ParamsError(f"encoder = {name!r}, but {weights} holds {card['encoder']!r} weights")
    if not get_recommender(model).uses_features:
        raise ParamsError(f"{model} is ID-only: there is no encoder to train with it")
    cfg, train_cfg, model_config = settings(params, model, seed)
    state = None
    if cfg.warm_start:
        if init is None or not init.is_file():
            raise ParamsError(
                f"e2e.warm_start is true, but the recommender state --init {init} does not exist "
                "(train the model on the pretrained features first, or set it false)"
            )
        state = torch.load(init, map_location="cpu", weights_only=True)
    data = load_interactions(interactions)
    encoder = load_encoder(weights)
    with world() as current, deterministic():
        seed_everything(train_cfg.seed)
        device = current.device(resolve_device(train_cfg.device))
        tmp_dir = None if checkpoint is None else checkpoint.parent  # the run's own temp folder
        built = build_end_to_end(
            model, data, encoder, table, model_config, cfg, device, current, state, tmp_dir
        )
        metrics = train_end_to_end(built, data, train_cfg, out, checkpoint)
    log.info("%s end to end with %s: %s", model, name, metrics)
    return metrics
