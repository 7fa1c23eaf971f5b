"""An encoder's pretrained weights folder: made by the demo pretraining, or pinned from a hub.

Weights tagged ``demo`` are made here: the LMM's ``from_arch`` model is trained with its own
image-text objective on the synthetic pretraining corpus, the baseline's CNN to classify the
corpus's visible attributes. Any other tag is published weights, fetched once by the family's
``pin`` so later stages never need the network.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.core.atomic import write_json
from pipeline.data.demo.corpus import Corpus, CorpusConfig, pretraining_corpus
from pipeline.encoders import get_encoder
from pipeline.encoders.base import BASELINE, DEMO_TAG
from pipeline.encoders.cnn_pretrain import CnnPretrainConfig, pretrain_cnn
from pipeline.encoders.pairtrain import PairTrainConfig, train_pairs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncoderSpec:
    """An encoder variant: architecture x weights tag (the `<encoder>` params section)."""

    arch: str
    pretrained: str


def make_weights(
    name: str,
    spec: EncoderSpec,
    out: Path,
    corpus_cfg: CorpusConfig,
    pair_cfg: PairTrainConfig,
    cnn_cfg: CnnPretrainConfig,
) -> dict:
    """Write the weights folder (state + weights.json card) of the encoder family ``name`` in
    the variant ``spec``: pinned hub weights (returns the card), or the demo's pretraining on
    the corpus of ``corpus_cfg`` (``cnn_cfg`` for the baseline, ``pair_cfg`` for an LMM;
    returns the history, also written as pretrain_history.json)."""
    family = get_encoder(name)
    if spec.pretrained != DEMO_TAG:
        return family.pin(spec.arch, spec.pretrained, out)
    corpus = pretraining_corpus(corpus_cfg)
    if name == BASELINE:
        return _pretrain_baseline(spec, corpus, cnn_cfg, out)
    torch.manual_seed(pair_cfg.seed)
    encoder = family.from_arch(spec.arch)
    history = train_pairs(encoder, corpus.images, corpus.captions, pair_cfg)
    encoder.pretrained = DEMO_TAG
    encoder.source = (
        f"demo pretraining from random init: {len(corpus)} corpus pairs, "
        f"{len(history['loss'])} epochs, final loss {history['loss'][-1]:.4f}"
    )
    encoder.save(out)
    write_json(out / "pretrain_history.json", history)
    log.info("demo %s pretrained on %d pairs", name, len(corpus))
    return history


def _pretrain_baseline(
    spec: EncoderSpec, corpus: Corpus, cfg: CnnPretrainConfig, out: Path
) -> dict:
    """The demo baseline: the CNN trained to classify the corpus's visible attributes."""
    encoder, history = pretrain_cnn(spec.arch, corpus, cfg)
    encoder.save(out)
    write_json(out / "pretrain_history.json", history)
    log.info("demo cnn_st CNN pretrained on %d images", len(corpus))
    return history
