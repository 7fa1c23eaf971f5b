"""The demo's stand-in for web-scale pretraining data: synthetic image–caption pairs.

Different items from the shop, drawn from the broader vocabulary (every shop value plus more
colours, patterns, shapes, types, brands and materials), rendered by the shop's own code so the
domains match. Captions read like alt text: they describe what is visible and sometimes name a
brand or material. Per-pair integer labels support supervised CNN pretraining.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.data.demo.attributes import (
    ATTRIBUTES,
    COLOUR_WORDS,
    PATTERN_WORDS,
    SHAPE_WORDS,
    TYPE_WORDS,
)
from pipeline.data.demo.render import Look, render_item

log = logging.getLogger(__name__)

CHUNK = 250  # pairs a rendering process takes at a time

CAPTIONS = (
    "a {colour} {pattern_adj} {type}",
    "{colour} {type} with {pattern_noun}",
    "photo of a {shape} {colour} {type}",
    "a {shape} {pattern_adj} {type} in {colour}",
    "product shot: {shape} {type}, {colour}, {pattern_noun}",
    "{colour} {type}",
    "close-up of a {pattern_adj} {colour} {type}",
    "{type} ({colour}, {pattern_adj}, {shape})",
    "image of a {colour} {type} with {pattern_noun}, {shape} design",
    "{shape} {colour} {type} on a light background",
)


@dataclass(frozen=True)
class CorpusConfig:
    """Size and wording of the pretraining corpus."""

    seed: int = 1234
    n_pairs: int = 8000
    image_size: int = 64  # pixels, square
    brand_rate: float = 0.3  # fraction of captions that name the brand
    material_rate: float = 0.3  # fraction of captions that name the material

    def __post_init__(self) -> None:
        if self.n_pairs < 1 or self.image_size < 1:
            raise ValueError(
                f"n_pairs = {self.n_pairs} and image_size = {self.image_size} must be >= 1"
            )
        for name in ("brand_rate", "material_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} = {getattr(self, name)} must be in [0, 1]")


@dataclass
class Corpus:
    """Image–caption pairs with the latent attribute labels of each pair."""

    images: list[Image.Image]  # RGB, image_size x image_size
    captions: list[str]
    attributes: dict[str, np.ndarray]  # name -> (n_pairs,) index into ATTRIBUTES[name].values

    def __len__(self) -> int:
        return len(self.captions)


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def caption(rng: np.random.Generator, values: dict[str, str], cfg: CorpusConfig) -> str:
    """An alt-text style caption of one item, in one of several templates."""
    adjs, nouns = PATTERN_WORDS[values["pattern"]]
    colours = COLOUR_WORDS[values["colour"]]
    noun = _pick(rng, TYPE_WORDS[values["product_type"]].synonyms)
    if rng.random() < cfg.material_rate:
        material = values["material"]
        noun = f"{material} {noun}" if rng.random() < 0.5 else f"{noun} made of {material}"
    text = _pick(rng, CAPTIONS).format(
        colour=colours[0] if rng.random() < 0.75 else _pick(rng, colours),
        pattern_adj=_pick(rng, adjs),
        pattern_noun=_pick(rng, nouns),
        shape=_pick(rng, SHAPE_WORDS[values["shape"]]),
        type=noun,
    )
    if rng.random() < cfg.brand_rate:
        text = f"{values['brand']} {text}" if rng.random() < 0.5 else f"{text} by {values['brand']}"
    text = re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)
    return text[0].upper() + text[1:] if rng.random() < 0.3 else text


def _render_pairs(cfg: CorpusConfig, start: int, stop: int) -> tuple[list, list, dict]:
    """Pairs ``start`` to ``stop`` - 1: their pixels ([S, S, 3] uint8 arrays), captions and
    labels. Pair i draws from its own generator, so any split of the range gives the same
    pairs."""
    labels = {name: np.empty(stop - start, np.int64) for name in ATTRIBUTES}
    pixels, captions = [], []
    for i in range(start, stop):
        rng = np.random.default_rng([cfg.seed, i])
        values = {}
        for name, attr in ATTRIBUTES.items():
            labels[name][i - start] = rng.integers(len(attr.values))
            values[name] = attr.values[labels[name][i - start]]
        look = Look(values["colour"], values["pattern"], values["shape"], values["product_type"])
        pixels.append(np.asarray(render_item(look, cfg.image_size, rng)))
        captions.append(caption(rng, values, cfg))
    return pixels, captions, labels


def _render_chunk(task: tuple[CorpusConfig, int, int]) -> tuple[list, list, dict]:
    return _render_pairs(*task)


def pretraining_corpus(cfg: CorpusConfig, workers: int | None = None) -> Corpus:
    """Generate ``cfg.n_pairs`` image–caption pairs over the broad vocabulary, deterministically:
    the same pairs for any number of rendering ``workers`` (processes; None: one per CPU this
    process may use, 1: render here)."""
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    if "fork" not in multiprocessing.get_all_start_methods():
        workers = 1
    bounds = list(range(0, cfg.n_pairs, CHUNK)) + [cfg.n_pairs]
    tasks = [(cfg, a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    workers = max(1, min(workers, len(tasks)))
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(tqdm(total=cfg.n_pairs, desc="pretraining corpus", disable=None))
        if workers > 1:  # forked: the workers run numpy and PIL only, never torch
            pool = stack.enter_context(multiprocessing.get_context("fork").Pool(workers))
            chunks = pool.imap(_render_chunk, tasks)
        else:
            chunks = map(_render_chunk, tasks)
        images, captions, parts = [], [], []
        for pixels, texts, labels in chunks:
            images += [Image.fromarray(p, "RGB") for p in pixels]
            captions += texts
            parts.append(labels)
            bar.update(len(texts))
    labels = {name: np.concatenate([part[name] for part in parts]) for name in ATTRIBUTES}
    log.info("pretraining corpus: %d pairs at %dpx", cfg.n_pairs, cfg.image_size)
    return Corpus(images=images, captions=captions, attributes=labels)
