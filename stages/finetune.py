"""finetune stage: adapt the LMM's pretrained weights to the dataset's item image-text pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.encoders import list_encoders
from pipeline.encoders.finetune import finetune_weights
from pipeline.encoders.pairtrain import PairTrainConfig
from stages.params import build, encoder_section, require


def run(params: dict[str, Any], items: Path, weights: Path, out: Path, metrics: Path) -> dict:
    """Fine-tune the weights in ``weights`` on ``items``; write ``out`` and ``metrics`` (see
    ``finetune_weights``)."""
    name = require(params, "encoder", list_encoders())
    dataset = require(params, "dataset")
    section = encoder_section(params.get("finetune") or {}, name, list_encoders(), "finetune")
    cfg = build(PairTrainConfig, section, "finetune")
    return finetune_weights(name, items, weights, out, metrics, cfg, dataset)
