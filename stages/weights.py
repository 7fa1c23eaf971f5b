"""weights stage: an encoder's pretrained weights, pinned into models/weights/<name>-pretrained/.

Weights tagged ``demo`` are made here: the family's ``from_arch`` model is trained with its own
image-text objective on the synthetic pretraining corpus. Any other tag is published weights,
fetched once by the family's ``pin`` so later stages never need the network.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.core.atomic import write_json
from pipeline.encoders import get_encoder, list_encoders
from stages.params import ParamsError, build, require

log = logging.getLogger(__name__)

DEMO_TAG = "demo"
BASELINE = "cnn_st"


@dataclass(frozen=True)
class EncoderSpec:
    """An encoder variant: architecture x weights tag (the `<encoder>` params section)."""

    arch: str
    pretrained: str


def run(params: dict[str, Any], out: Path, encoder: str | None = None) -> dict:
    """Write the weights folder (state + weights.json card) of ``encoder`` (default: the
    params' ``encoder``, the LMM under study; ``cnn_st`` is the baseline)."""
    name = encoder or require(params, "encoder", list_encoders())
    if name not in list_encoders():
        raise ParamsError(f"unknown encoder {name!r}; allowed: {list_encoders()}")
    spec = build(EncoderSpec, require(params, name), name)
    family = get_encoder(name)
    if spec.pretrained != DEMO_TAG:
        return family.pin(spec.arch, spec.pretrained, out)

    from pipeline.data.demo.corpus import CorpusConfig, pretraining_corpus

    corpus = pretraining_corpus(
        build(CorpusConfig, params.get("pretrain_corpus"), "pretrain_corpus")
    )
    if name == BASELINE:
        return _pretrain_baseline(params, spec, corpus, out)

    from pipeline.encoders.pairtrain import PairTrainConfig, train_pairs

    cfg = build(PairTrainConfig, params.get("weights"), "weights")
    torch.manual_seed(cfg.seed)
    encoder = family.from_arch(spec.arch)
    history = train_pairs(encoder, corpus.images, corpus.captions, cfg)
    encoder.pretrained = DEMO_TAG
    encoder.source = (
        f"demo pretraining from random init: {len(corpus)} corpus pairs, "
        f"{len(history['loss'])} epochs, final loss {history['loss'][-1]:.4f}"
    )
    encoder.save(out)
    write_json(out / "pretrain_history.json", history)
    log.info("demo %s pretrained on %d pairs", name, len(corpus))
    return history


def _pretrain_baseline(params: dict[str, Any], spec: EncoderSpec, corpus: Any, out: Path) -> dict:
    """The demo baseline: the CNN trained to classify the corpus's visible attributes."""
    from pipeline.encoders.cnn_pretrain import CnnPretrainConfig, pretrain_cnn

    cfg = build(CnnPretrainConfig, params.get("cnn_weights"), "cnn_weights")
    encoder, history = pretrain_cnn(spec.arch, corpus, cfg)
    encoder.save(out)
    write_json(out / "pretrain_history.json", history)
    log.info("demo cnn_st CNN pretrained on %d images", len(corpus))
    return history
