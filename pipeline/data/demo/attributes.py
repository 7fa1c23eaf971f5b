"""The demo world's attribute vocabulary: what items can look like and what their text can say.

Each attribute has a broad vocabulary (used by the pretraining corpus); the shop draws only from
the first ``n_shop`` values, so a label index means the same value in the shop and the corpus.
Colour, pattern and shape show only in the image; brand and material only in the text; the
product type shows in both (its own silhouette, and its name in the title).
"""

from __future__ import annotations

from dataclasses import dataclass

VISIBILITY = ("image", "text", "both")


@dataclass(frozen=True)
class Attribute:
    """One latent item attribute: its values and where it can be seen."""

    name: str
    visible: str  # one of VISIBILITY
    values: tuple[str, ...]  # the broad (corpus) vocabulary
    n_shop: int  # the shop uses values[:n_shop]

    @property
    def shop_values(self) -> tuple[str, ...]:
        return self.values[: self.n_shop]

    def index(self, value: str) -> int:
        """Label of ``value``; an unknown value lists the allowed ones."""
        try:
            return self.values.index(value)
        except ValueError:
            raise ValueError(
                f"unknown {self.name} {value!r}; allowed: {list(self.values)}"
            ) from None


ATTRIBUTES: dict[str, Attribute] = {
    a.name: a
    for a in (
        Attribute(
            "colour",
            "image",
            (
                "red", "orange", "yellow", "green", "blue", "purple", "pink", "black",
                "teal", "brown", "grey", "white", "navy", "maroon",
            ),
            8,
        ),
        Attribute(
            "pattern",
            "image",
            ("plain", "stripes", "dots", "checks", "gradient", "zigzag", "rings", "diamonds"),
            5,
        ),
        Attribute("shape", "image", ("rounded", "angular", "tall", "wide", "tiny", "tilted"), 4),
        Attribute(
            "product_type",
            "both",
            (
                "mug", "bottle", "shirt", "shoe", "bag", "lamp", "chair", "hat", "clock", "vase",
                "umbrella", "teapot", "glasses", "kite", "table",
            ),
            10,
        ),
        Attribute(
            "brand",
            "text",
            (
                "Nordvik", "Lumacraft", "Halden & Co", "Pellico", "Marlowe", "Tavira", "Oskari",
                "Brevik", "Casteno", "Fjellby", "Quillon", "Arbora",
                "Zentrix", "Velora", "Kindred", "Saltmarsh",
            ),
            12,
        ),
        Attribute(
            "material",
            "text",
            (
                "cotton", "leather", "wool", "bamboo", "steel", "ceramic", "glass", "linen",
                "cork", "rattan",
            ),
            8,
        ),
    )
}  # fmt: skip

IMAGE_ATTRIBUTES = tuple(n for n, a in ATTRIBUTES.items() if a.visible in ("image", "both"))
TEXT_ATTRIBUTES = tuple(n for n, a in ATTRIBUTES.items() if a.visible in ("text", "both"))

# Base RGB of each colour; renders jitter around it.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (205, 35, 40),
    "orange": (240, 135, 25),
    "yellow": (240, 215, 40),
    "green": (40, 150, 60),
    "blue": (35, 90, 210),
    "purple": (125, 55, 170),
    "pink": (245, 125, 185),
    "black": (35, 35, 38),
    "teal": (20, 150, 150),
    "brown": (120, 75, 35),
    "grey": (128, 128, 128),
    "white": (250, 250, 250),
    "navy": (25, 35, 100),
    "maroon": (115, 20, 45),
}

# Every word that names a colour: shop text must never contain one.
COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson"),
    "orange": ("orange",),
    "yellow": ("yellow", "golden"),
    "green": ("green",),
    "blue": ("blue", "cobalt"),
    "purple": ("purple", "violet"),
    "pink": ("pink", "rose"),
    "black": ("black",),
    "teal": ("teal", "turquoise"),
    "brown": ("brown", "chocolate"),
    "grey": ("grey", "gray"),
    "white": ("white",),
    "navy": ("navy", "navy blue"),
    "maroon": ("maroon", "burgundy"),
}

# Caption phrases for the image-only attributes: (adjectives, noun phrases).
PATTERN_WORDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "plain": (("plain", "solid"), ("a plain finish", "no pattern")),
    "stripes": (("striped",), ("stripes", "a striped pattern")),
    "dots": (("polka-dot", "dotted", "spotted"), ("polka dots", "dots", "spots")),
    "checks": (("checked", "checkered", "plaid"), ("checks", "a check pattern")),
    "gradient": (("gradient", "ombre", "fading"), ("a gradient", "an ombre fade")),
    "zigzag": (("zigzag", "chevron"), ("zigzags", "a chevron pattern")),
    "rings": (("ringed", "concentric-ring"), ("rings", "concentric circles")),
    "diamonds": (("argyle", "diamond-print"), ("diamonds", "a diamond pattern")),
}
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "rounded": ("rounded", "curvy", "soft-edged"),
    "angular": ("angular", "sharp-edged", "boxy"),
    "tall": ("tall", "slender", "narrow"),
    "wide": ("wide", "squat", "broad"),
    "tiny": ("tiny", "small", "miniature"),
    "tilted": ("tilted", "slanted", "leaning"),
}


@dataclass(frozen=True)
class TypeWords:
    """How the text names a product type: synonyms, category plural, department."""

    synonyms: tuple[str, ...]
    plural: str
    department: str


TYPE_WORDS: dict[str, TypeWords] = {
    "mug": TypeWords(("mug", "coffee mug", "cup"), "Mugs", "Kitchen & Dining"),
    "bottle": TypeWords(("bottle", "water bottle", "flask"), "Bottles", "Kitchen & Dining"),
    "shirt": TypeWords(("shirt", "t-shirt", "tee"), "Shirts", "Clothing"),
    "shoe": TypeWords(("shoe", "sneaker", "trainer"), "Shoes", "Clothing"),
    "bag": TypeWords(("bag", "tote bag", "handbag"), "Bags", "Accessories"),
    "lamp": TypeWords(("lamp", "desk lamp", "reading light"), "Lamps", "Home"),
    "chair": TypeWords(("chair", "armchair", "seat"), "Chairs", "Home"),
    "hat": TypeWords(("hat", "cap", "sun hat"), "Hats", "Clothing"),
    "clock": TypeWords(("clock", "wall clock", "timepiece"), "Clocks", "Home"),
    "vase": TypeWords(("vase", "flower vase", "jar"), "Vases", "Home"),
    "umbrella": TypeWords(("umbrella", "parasol"), "Umbrellas", "Accessories"),
    "teapot": TypeWords(("teapot", "tea kettle"), "Teapots", "Kitchen & Dining"),
    "glasses": TypeWords(("glasses", "spectacles", "eyeglasses"), "Eyewear", "Accessories"),
    "kite": TypeWords(("kite", "stunt kite"), "Kites", "Toys"),
    "table": TypeWords(("table", "side table"), "Tables", "Home"),
}


def _check_vocabulary() -> None:
    for attr in ATTRIBUTES.values():
        assert attr.visible in VISIBILITY, attr
        assert 0 < attr.n_shop < len(attr.values), attr
        assert len(set(attr.values)) == len(attr.values), attr
    assert set(COLOUR_RGB) == set(COLOUR_WORDS) == set(ATTRIBUTES["colour"].values)
    assert set(PATTERN_WORDS) == set(ATTRIBUTES["pattern"].values)
    assert set(SHAPE_WORDS) == set(ATTRIBUTES["shape"].values)
    assert set(TYPE_WORDS) == set(ATTRIBUTES["product_type"].values)


_check_vocabulary()
