"""Shop text for the demo world: item metadata records and reviews, in varied wording.

Shop text names the product type and (often) the brand and material, never the colour, pattern
or shape: those show only in the image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pipeline.data.demo.attributes import ATTRIBUTES, TYPE_WORDS

if TYPE_CHECKING:
    from pipeline.data.demo.shop import ShopWorld

ADJECTIVES = (
    "Classic", "Everyday", "Premium", "Handmade", "Modern", "Compact", "Deluxe", "Essential",
    "Vintage-Style", "Chef's", "Kid's", "Studio",
)  # fmt: skip
TAGLINES = (
    "Gift Idea", "Limited Edition", "Everyday Essential", "Easy Care", "New Model", "2-Pack",
    "Large", "Travel Size",
)  # fmt: skip
TITLES = (
    "{brand} {Material} {Type}",
    "{Type} by {brand}",
    "{brand} {Type} - {tagline}",
    "{Material} {Type}, {tagline}",
    "{adj} {Material} {Type}",
    "{adj} {Type} ({material})",
    "{brand} {adj} {Type}",
    "{Type} - {tagline}",
)
MATERIAL_SENTENCES = (
    "Made from {material}.",
    "Crafted from durable {material}.",
    "{Material} construction for everyday use.",
    "Quality {material} &amp; careful stitching.",
    "The {material} body is easy to care for.",
)
BRAND_SENTENCES = (
    "This {type} from {brand} is built to last.",
    "{brand} has made quality goods since {year}.",
    "Another favourite from {brand}.",
)
OTHER_SENTENCES = (
    "Dimensions: {a} x {b} cm.",
    "Ships in recyclable packaging.",
    "Our customers&#39; favourite {type}.",
    "Comfort &amp; quality in one.",
    "Part of the &quot;{adj}&quot; range.",
    "Perfect for the café, the office or home.",
    "Wipe clean with a damp cloth.",
    "Satisfaction guaranteed!",
    "A thoughtful gift for friends and family.",
)
FIRST_NAMES = (
    "Amy", "Ben", "Carla", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jon", "Kemi",
    "Lars", "Maya", "Nils", "Olu", "Priya", "Quinn", "Rosa", "Sam", "Tomas", "Uma", "Vik",
)  # fmt: skip
LAST_NAMES = ("Smith", "Okafor", "Lindqvist", "Garcia", "Tanaka", "Novak", "O'Brien", "Patel")
NICKNAMES = ("Happy Shopper", "Book Lover", "mom of 3", "J.", "Kindle Customer")
REVIEWS = {
    "good": (
        "Love this {type}!",
        "Exactly as described.",
        "The {material} feels really solid.",
        "Great quality for the price.",
        "Would buy from {brand} again.",
        "My sister loves it.",
        "Arrived quickly and well packed.",
    ),
    "ok": (
        "It's okay.",
        "Does the job, nothing special.",
        "A bit smaller than I expected.",
        "Fine for the price, I guess.",
    ),
    "bad": (
        "Broke after a week.",
        "Not worth the money.",
        "The {material} feels cheap.",
        "Returned it.",
        "Nothing like the picture.",
    ),
}
SUMMARIES = {
    "good": ("Great {type}", "Five stars", "Love it", "Highly recommend", "Very happy"),
    "ok": ("OK", "Average", "Does the job", "Three stars"),
    "bad": ("Disappointed", "Not as expected", "Poor quality", "Would not buy again"),
}


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _words(rng: np.random.Generator, world: ShopWorld, i: int) -> dict[str, str]:
    a = world.item_attributes
    ptype = ATTRIBUTES["product_type"].values[a["product_type"][i]]
    material = ATTRIBUTES["material"].values[a["material"][i]]
    synonym = _pick(rng, TYPE_WORDS[ptype].synonyms)
    return {
        "type": synonym,
        "Type": synonym.title().replace("T-Shirt", "T-shirt"),
        "material": material,
        "Material": material.capitalize(),
        "brand": ATTRIBUTES["brand"].values[a["brand"][i]],
        "adj": _pick(rng, ADJECTIVES),
        "tagline": _pick(rng, TAGLINES),
        "year": str(int(rng.integers(1950, 2010))),
        "a": str(int(rng.integers(5, 40))),
        "b": str(int(rng.integers(5, 40))),
    }


def _description(rng: np.random.Generator, words: dict[str, str]) -> str:
    sentences = [_pick(rng, OTHER_SENTENCES) for _ in range(int(rng.integers(1, 3)))]
    if rng.random() < 0.75:
        sentences.append(_pick(rng, MATERIAL_SENTENCES))
    if rng.random() < 0.4:
        sentences.append(_pick(rng, BRAND_SENTENCES))
    rng.shuffle(sentences)
    sep = "\n" if rng.random() < 0.2 else " "
    return sep.join(dict.fromkeys(s.format(**words) for s in sentences))


def item_meta(
    rng: np.random.Generator, world: ShopWorld, i: int, category: str, image_host: str
) -> dict:
    """One metadata record shaped like a line of an Amazon 2014 ``meta_*.json.gz`` file."""
    words = _words(rng, world, i)
    ptype = ATTRIBUTES["product_type"].values[world.item_attributes["product_type"][i]]
    asin = world.asins[i]
    brand = words["brand"].replace("&", "&amp;") if rng.random() < 0.5 else words["brand"]
    title = _pick(rng, TITLES).format(**{**words, "brand": brand})
    rec: dict = {"asin": asin}
    if rng.random() < 0.92:
        rec["description"] = _description(rng, words)
    rec["title"] = title
    if rng.random() < 0.9:
        rec["price"] = round(float(rng.uniform(4.0, 90.0)), 2)
    rec["imUrl"] = f"{image_host}/{asin}.jpg"
    if rng.random() < 0.85:
        others = rng.choice(len(world.asins), int(rng.integers(2, 8)), replace=False)
        rec["related"] = {"also_bought": [world.asins[j] for j in others if j != i]}
    if rng.random() < 0.9:
        rank = int(world.popularity_rank[i]) * int(rng.integers(20, 60))
        rec["salesRank"] = {category: rank}
    paths = [[category, TYPE_WORDS[ptype].plural]]
    if rng.random() < 0.3:
        paths.append([category, TYPE_WORDS[ptype].department])
    rec["categories"] = paths
    if rng.random() < 0.94:
        rec["brand"] = brand
    return rec


def reviewer_name(rng: np.random.Generator) -> str | None:
    """A reviewer's display name, or None when the record should omit it."""
    r = rng.random()
    if r < 0.05:
        return None
    if r < 0.15:
        return _pick(rng, NICKNAMES)
    first = _pick(rng, FIRST_NAMES)
    if r < 0.6:
        return f"{first} {_pick(rng, LAST_NAMES)}"
    return f"{first[0]}. {_pick(rng, LAST_NAMES)}"


def review(
    rng: np.random.Generator, rating: float, ptype: str, world: ShopWorld, i: int
) -> tuple[str, str]:
    """Review text and summary whose tone follows the rating."""
    tone = "good" if rating >= 4 else "ok" if rating == 3 else "bad"
    words = {
        "type": TYPE_WORDS[ptype].synonyms[0],
        "material": ATTRIBUTES["material"].values[world.item_attributes["material"][i]],
        "brand": ATTRIBUTES["brand"].values[world.item_attributes["brand"][i]],
    }
    n = int(rng.integers(1, 4))
    picks = rng.choice(len(REVIEWS[tone]), n, replace=False)
    body = " ".join(REVIEWS[tone][k].format(**words) for k in picks)
    return body, _pick(rng, SUMMARIES[tone]).format(**words)
