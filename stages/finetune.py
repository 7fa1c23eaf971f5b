"""finetune stage: adapt the LMM's pretrained weights to the dataset's item image-text pairs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.core.atomic import write_json
from pipeline.core.distributed import world
from pipeline.data.prepared import require_raw_items
from pipeline.data.schemas import ITEMS, read_table
from pipeline.encoders import get_encoder, list_encoders
from pipeline.encoders.finetune import finetune
from pipeline.encoders.pairtrain import PairTrainConfig
from stages.params import ParamsError, build, require

log = logging.getLogger(__name__)


def settings(section: dict[str, Any], encoder: str) -> dict[str, Any]:
    """The ``finetune`` section for ``encoder``: shared keys, overridden by the mapping under
    the encoder's own name (e.g. ``finetune.vlmo.lr``); other encoders' mappings dropped."""
    shared = {k: v for k, v in section.items() if k not in list_encoders()}
    own = section.get(encoder) or {}
    if not isinstance(own, dict):
        raise ParamsError(f"finetune.{encoder} must be a mapping of settings, got {own!r}")
    return {**shared, **own}


def run(params: dict[str, Any], items: Path, weights: Path, out: Path, metrics: Path) -> dict:
    """Fine-tune the weights in ``weights`` on ``items``; write ``out`` and ``metrics``. Under
    ``torchrun --nproc_per_node N`` the processes share each step's micro-batches
    (``finetune.grad_accum`` >= N) and rank 0 writes."""
    name = require(params, "encoder", list_encoders())
    dataset = require(params, "dataset")
    cfg = build(PairTrainConfig, settings(params.get("finetune") or {}, name), "finetune")
    table = read_table(items, ITEMS, "items")
    require_raw_items(items, table, f"finetune {name}")
    encoder = get_encoder(name).load(weights)
    with world() as current:
        result = finetune(encoder, table, cfg, dataset, current)
    if not current.is_main:
        return result
    encoder.save(out)
    write_json(metrics, {"encoder": name, "pretrained": encoder.pretrained, **result})
    log.info(
        "finetune %s on %s: held-out i2t R@10 %.3f -> %.3f",
        name, dataset, result["before"]["i2t_r10"], result["after"]["i2t_r10"],
    )  # fmt: skip
    return result
