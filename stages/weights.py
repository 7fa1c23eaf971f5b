"""weights stage: pretrained encoder weights pinned into models/weights/<encoder>/.

Demo weights (``pretrained: demo``) are made here by pretraining on the synthetic corpus;
any other tag is fetched once from open_clip's hub and pinned, so later stages never need it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.atomic import write_json
from pipeline.encoders import list_encoders
from stages.params import build, require

log = logging.getLogger(__name__)

DEMO_TAG = "demo"


@dataclass(frozen=True)
class EncoderSpec:
    """An encoder variant: architecture x weights tag (the `<encoder>` params section)."""

    arch: str
    pretrained: str


def run(params: dict[str, Any], out: Path) -> dict:
    """Write the weights folder (state + weights.json card) for ``params['encoder']``."""
    encoder = require(params, "encoder", list_encoders())
    spec = build(EncoderSpec, require(params, encoder), encoder)
    from pipeline.encoders.clip import pin_open_clip_weights

    if spec.pretrained != DEMO_TAG:
        return pin_open_clip_weights(spec.arch, spec.pretrained, out)

    from pipeline.demo.corpus import CorpusConfig, pretraining_corpus
    from pipeline.encoders.pretrain import PretrainConfig, pretrain_clip

    corpus = pretraining_corpus(
        build(CorpusConfig, params.get("pretrain_corpus"), "pretrain_corpus")
    )
    cfg = build(PretrainConfig, params.get("weights"), "weights")
    model, history = pretrain_clip(spec.arch, corpus.images, corpus.captions, cfg)
    model.save(out)
    write_json(out / "pretrain_history.json", history)
    log.info("demo CLIP pretrained on %d pairs: %s", len(corpus), history)
    return history
