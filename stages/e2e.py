"""e2e stage: one recommender trained jointly with the params' LMM from raw item images and
texts, starting from the pretrained weights (the feature store is never read)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.encoders import list_encoders
from pipeline.training.e2e import E2EConfig, run_end_to_end
from pipeline.training.trainer import TrainConfig
from stages.params import ParamsError, build, encoder_section, model_settings, require, train_config

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
    encoder = require(params, "encoder", list_encoders())
    section = encoder_section(section, encoder, list_encoders(), "e2e")
    cfg = build(E2EConfig, {k: v for k, v in section.items() if k not in OVERRIDES}, "e2e")
    shared, shared_train = model_settings(require(params, "recommenders"), model)
    own, own_train = model_settings(section.get("recommenders"), model, "e2e.recommenders")
    train_cfg = train_config(
        TrainConfig, params, shared_train, section.get("train") or {}, own_train, seed=seed
    )
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
    cfg, train_cfg, model_config = settings(params, model, seed)
    name = require(params, "encoder", list_encoders())
    return run_end_to_end(
        model, name, items, interactions, weights, out, cfg, train_cfg, model_config,
        checkpoint, init,
    )  # fmt: skip
