"""weights stage: an encoder's pretrained weights, pinned into models/weights/<name>-pretrained/
(demo weights are made by the demo pretraining, see ``pipeline.encoders.pretrain``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.data.demo.corpus import CorpusConfig
from pipeline.encoders import list_encoders
from pipeline.encoders.cnn_pretrain import CnnPretrainConfig
from pipeline.encoders.pairtrain import PairTrainConfig
from pipeline.encoders.pretrain import EncoderSpec, make_weights
from stages.params import ParamsError, build, require


def run(params: dict[str, Any], out: Path, encoder: str | None = None) -> dict:
    """Write the weights folder (state + weights.json card) of ``encoder`` (default: the
    params' ``encoder``, the LMM under study; ``cnn_st`` is the baseline)."""
    name = encoder or require(params, "encoder", list_encoders())
    if name not in list_encoders():
        raise ParamsError(f"unknown encoder {name!r}; allowed: {list_encoders()}")
    spec = build(EncoderSpec, require(params, name), name)
    return make_weights(
        name,
        spec,
        out,
        build(CorpusConfig, params.get("pretrain_corpus"), "pretrain_corpus"),
        build(PairTrainConfig, params.get("weights"), "weights"),
        build(CnnPretrainConfig, params.get("cnn_weights"), "cnn_weights"),
    )
