"""Procedural product photos for the demo world, drawn with PIL and NumPy.

An item's look is its colour, pattern, shape variant and product type. Each product type has its
own silhouette (a few primitives in a unit box); the shape variant stretches it (tall, wide,
tiny), rounds or sharpens its corners, or tilts it; the pattern fills it in shades of the colour.
Position, size, rotation, background tint and pixel noise are jittered per image, so no two
items render alike. The shop and the pretraining corpus share this code, so their domains match.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pipeline.data.demo.attributes import ATTRIBUTES, COLOUR_RGB

SUPERSAMPLE = 2  # silhouettes are drawn at this multiple of the output size, then reduced

# Primitives in a unit box (x right, y down):
#   ("rect", x0, y0, x1, y1)  ("ellipse", x0, y0, x1, y1)  ("half", x0, y0, x1, y1): upper half
#   ("ring", x0, y0, x1, y1, width)  ("line", x0, y0, x1, y1, width)  ("poly", (x, y), ...)
#   ("hole", x0, y0, x1, y1, width): a line cut out of the silhouette after rounding
SILHOUETTES: dict[str, tuple[tuple, ...]] = {
    "mug": (("rect", 0.18, 0.22, 0.68, 0.92), ("ring", 0.52, 0.36, 0.9, 0.76, 0.09)),
    "bottle": (
        ("rect", 0.41, 0.04, 0.59, 0.26),
        ("ellipse", 0.28, 0.18, 0.72, 0.48),
        ("rect", 0.28, 0.32, 0.72, 0.96),
    ),
    "shirt": (
        ("poly", (0.32, 0.08), (0.43, 0.08), (0.5, 0.16), (0.57, 0.08), (0.68, 0.08),
         (0.96, 0.3), (0.85, 0.46), (0.76, 0.38), (0.76, 0.94), (0.24, 0.94), (0.24, 0.38),
         (0.15, 0.46), (0.04, 0.3)),
    ),
    "shoe": (
        ("poly", (0.06, 0.8), (0.06, 0.3), (0.34, 0.3), (0.46, 0.5), (0.84, 0.58),
         (0.94, 0.72), (0.94, 0.8)),
        ("rect", 0.04, 0.78, 0.96, 0.9),
    ),
    "bag": (
        ("poly", (0.14, 0.4), (0.86, 0.4), (0.94, 0.94), (0.06, 0.94)),
        ("ring", 0.28, 0.08, 0.72, 0.62, 0.08),
    ),
    "lamp": (
        ("poly", (0.3, 0.06), (0.7, 0.06), (0.86, 0.44), (0.14, 0.44)),
        ("rect", 0.45, 0.42, 0.55, 0.86),
        ("ellipse", 0.24, 0.8, 0.76, 0.96),
    ),
    "chair": (
        ("rect", 0.24, 0.04, 0.76, 0.5),
        ("rect", 0.18, 0.46, 0.82, 0.6),
        ("rect", 0.2, 0.56, 0.3, 0.96),
        ("rect", 0.7, 0.56, 0.8, 0.96),
    ),
    "hat": (("ellipse", 0.28, 0.16, 0.72, 0.72), ("ellipse", 0.04, 0.56, 0.96, 0.8)),
    "clock": (
        ("ellipse", 0.08, 0.08, 0.92, 0.92),
        ("hole", 0.5, 0.5, 0.5, 0.2, 0.06),
        ("hole", 0.5, 0.5, 0.72, 0.6, 0.06),
    ),
    "vase": (
        ("ellipse", 0.18, 0.36, 0.82, 0.96),
        ("rect", 0.37, 0.1, 0.63, 0.46),
        ("rect", 0.3, 0.04, 0.7, 0.13),
    ),
    "umbrella": (
        ("half", 0.04, 0.1, 0.96, 0.9),
        ("line", 0.5, 0.48, 0.5, 0.86, 0.05),
        ("ring", 0.36, 0.76, 0.52, 0.96, 0.05),
    ),
    "teapot": (
        ("ellipse", 0.22, 0.34, 0.78, 0.92),
        ("ellipse", 0.4, 0.22, 0.6, 0.4),
        ("poly", (0.72, 0.58), (0.94, 0.3), (0.99, 0.36), (0.76, 0.74)),
        ("ring", 0.04, 0.44, 0.34, 0.8, 0.07),
    ),
    "glasses": (
        ("ellipse", 0.04, 0.34, 0.46, 0.72),
        ("ellipse", 0.54, 0.34, 0.96, 0.72),
        ("line", 0.44, 0.46, 0.56, 0.46, 0.05),
    ),
    "kite": (
        ("poly", (0.5, 0.04), (0.84, 0.42), (0.5, 0.82), (0.16, 0.42)),
        ("line", 0.5, 0.82, 0.42, 0.98, 0.03),
    ),
    "table": (
        ("rect", 0.04, 0.3, 0.96, 0.42),
        ("rect", 0.1, 0.4, 0.19, 0.92),
        ("rect", 0.81, 0.4, 0.9, 0.92),
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Look:
    """The image-visible attributes of one item."""

    colour: str
    pattern: str
    shape: str
    product_type: str

    def __post_init__(self) -> None:
        for name in ("colour", "pattern", "shape", "product_type"):
            ATTRIBUTES[name].index(getattr(self, name))  # raises naming the allowed values


def _polygon_of_ellipse(x0: float, y0: float, x1: float, y1: float, n: int, start: float = 0):
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    angles = start + np.linspace(0, 2 * np.pi, n, endpoint=False)
    return [(cx + rx * np.cos(a), cy + ry * np.sin(a)) for a in angles]


def _draw_silhouette(
    product_type: str, shape: str, box: tuple[float, float, float, float], size: int
) -> Image.Image:
    """Draw the product type's silhouette into ``box`` (x, y, w, h in pixels) as an L mask."""
    bx, by, bw, bh = box
    scale = (bw + bh) / 2

    def pt(u: float, v: float) -> tuple[float, float]:
        return bx + u * bw, by + v * bh

    def rect_box(p: tuple) -> list[float]:
        (x0, y0), (x1, y1) = pt(p[0], p[1]), pt(p[2], p[3])
        return [x0, y0, x1, y1]

    angular = shape == "angular"
    corner = {"rounded": 0.45, "angular": 0.0}.get(shape, 0.15)
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    holes = []
    for prim in SILHOUETTES[product_type]:
        kind = prim[0]
        if kind == "rect":
            x0, y0, x1, y1 = rect_box(prim[1:])
            radius = corner * min(x1 - x0, y1 - y0)
            draw.rounded_rectangle([x0, y0, x1, y1], radius=radius, fill=255)
        elif kind in ("ellipse", "ring"):
            b = rect_box(prim[1:5])
            width = max(1, round(prim[5] * scale)) if kind == "ring" else 0
            if angular:
                poly = _polygon_of_ellipse(*b, n=6, start=np.pi / 6)
                if width:
                    draw.polygon(poly, outline=255, width=width)
                else:
                    draw.polygon(poly, fill=255)
            elif width:
                draw.ellipse(b, outline=255, width=width)
            else:
                draw.ellipse(b, fill=255)
        elif kind == "half":
            b = rect_box(prim[1:])
            if angular:
                poly = _polygon_of_ellipse(*b, n=8)
                draw.polygon([poly[0], *poly[4:], poly[0]], fill=255)
            else:
                draw.pieslice(b, 180, 360, fill=255)
        elif kind == "line":
            draw.line([*pt(*prim[1:3]), *pt(*prim[3:5])], fill=255, width=round(prim[5] * scale))
        elif kind == "poly":
            draw.polygon([pt(u, v) for u, v in prim[1:]], fill=255)
        elif kind == "hole":
            holes.append(prim)
        else:
            raise ValueError(f"unknown primitive {kind!r} in silhouette {product_type!r}")
    if shape == "rounded":
        blurred = mask.filter(ImageFilter.GaussianBlur(0.03 * scale))
        mask = blurred.point(lambda v: 255 if v >= 100 else 0)
        draw = ImageDraw.Draw(mask)
    for prim in holes:
        draw.line([*pt(*prim[1:3]), *pt(*prim[3:5])], fill=0, width=round(prim[5] * scale))
    return mask


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    return xs, ys


def _second_colour(c1: np.ndarray) -> np.ndarray:
    lum = 0.299 * c1[0] + 0.587 * c1[1] + 0.114 * c1[2]
    if lum < 90:
        return c1 + (255 - c1) * 0.5
    return c1 * (0.6 if lum > 190 else 0.55)


def _texture(
    pattern: str, c1: np.ndarray, size: int, centre: tuple[float, float], rng: np.random.Generator
) -> np.ndarray:
    """An (size, size, 3) float image of the pattern in shades of ``c1``."""
    xs, ys = _grid(size)
    c2 = _second_colour(c1)
    period = size * rng.uniform(0.12, 0.18)
    ox, oy = rng.uniform(0, period, 2)
    if pattern in ("plain", "gradient"):
        angle = rng.uniform(0, 2 * np.pi)
        t = (np.cos(angle) * (xs - size / 2) + np.sin(angle) * (ys - size / 2)) / size + 0.5
        amount = 0.08 if pattern == "plain" else 0.95
        t = np.clip(t, 0, 1)[..., None] * amount
        return c1 * (1 - t) + c2 * t
    if pattern == "stripes":
        coord = ys if rng.random() < 0.5 else xs
        sel = (coord + oy) % period < period / 2
    elif pattern == "dots":
        radius = period * rng.uniform(0.24, 0.32)
        dx = (xs + ox) % period - period / 2
        dy = (ys + oy) % period - period / 2
        sel = dx * dx + dy * dy < radius * radius
    elif pattern == "checks":
        sel = (np.floor((xs + ox) / period) + np.floor((ys + oy) / period)) % 2 == 0
    elif pattern == "zigzag":
        tri = np.abs((xs + ox) % period - period / 2)
        sel = (ys + oy + tri) % period < period / 2
    elif pattern == "rings":
        dist = np.hypot(xs - centre[0], ys - centre[1])
        sel = (dist + ox) % period < period / 2
    elif pattern == "diamonds":
        p = period * 1.2
        sel = (np.floor((xs + ys + ox) / p) + np.floor((xs - ys + oy) / p)) % 2 == 0
    else:
        raise ValueError(f"no texture for pattern {pattern!r}; add one in render._texture")
    return np.where(sel[..., None], c2, c1)


def render_item(look: Look, size: int, rng: np.random.Generator) -> Image.Image:
    """Render one product photo (RGB, ``size`` x ``size``); all jitter comes from ``rng``."""
    big = size * SUPERSAMPLE
    s = rng.uniform(0.38, 0.48) if look.shape == "tiny" else rng.uniform(0.66, 0.84)
    w, h = {"tall": (0.6 * s, s), "wide": (s, 0.6 * s)}.get(look.shape, (s, s))
    if look.shape == "tilted":
        angle = rng.choice([-1, 1]) * rng.uniform(24, 34)
    else:
        angle = rng.uniform(-8, 8)
    rad = np.deg2rad(angle)
    ext_x = 0.5 * (w * abs(np.cos(rad)) + h * abs(np.sin(rad)))
    ext_y = 0.5 * (w * abs(np.sin(rad)) + h * abs(np.cos(rad)))
    cx = rng.uniform(min(ext_x, 0.5), max(1 - ext_x, 0.5))
    cy = rng.uniform(min(ext_y, 0.5), max(1 - ext_y, 0.5))
    box = ((cx - w / 2) * big, (cy - h / 2) * big, w * big, h * big)
    mask = _draw_silhouette(look.product_type, look.shape, box, big)
    mask = mask.rotate(angle, resample=Image.BILINEAR, center=(cx * big, cy * big))
    mask = mask.resize((size, size), Image.BOX)
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255.0

    c1 = np.clip(np.asarray(COLOUR_RGB[look.colour], np.float32) + rng.normal(0, 8, 3), 0, 255)
    tex = _texture(look.pattern, c1, size, (cx * size, cy * size), rng)

    xs, ys = _grid(size)
    bg = rng.uniform(200, 245) + rng.normal(0, 7, 3).astype(np.float32)
    bg = bg + (ys[..., None] / size - 0.5) * rng.uniform(-14, 14)
    shadow = np.asarray(
        mask.transform(mask.size, Image.AFFINE, (1, 0, -2, 0, 1, -2)).filter(
            ImageFilter.GaussianBlur(1.5)
        ),
        dtype=np.float32,
    )[..., None]
    bg = bg * (1 - 0.3 * shadow / 255.0)
    img = bg * (1 - alpha) + tex * alpha + rng.normal(0, 3, (size, size, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
