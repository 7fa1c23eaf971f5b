"""The demo world: a deterministic synthetic shop (Amazon 2014 raw formats) and a separate
image–caption corpus that stands in for web-scale pretraining data."""

from pipeline.data.demo.corpus import Corpus, CorpusConfig, pretraining_corpus
from pipeline.data.demo.shop import DemoConfig, ShopWorld, build_world, generate_shop

__all__ = [
    "Corpus",
    "CorpusConfig",
    "DemoConfig",
    "ShopWorld",
    "build_world",
    "generate_shop",
    "pretraining_corpus",
]
