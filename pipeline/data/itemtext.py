"""Item text as MMRec builds it from Amazon 2014 metadata: the string text encoders read.

MMRec (``preprocessing/3feat-encoder.ipynb``) joins title, brand, each entry of the first
category path and the description with single spaces, a missing field counting as blank, and
replaces newlines with spaces. We do the same, and also unescape HTML entities, flatten tabs
and carriage returns and collapse runs of whitespace, so that equal content gives equal text.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping
from typing import Any

_WHITESPACE = re.compile(r"\s+")


def clean_text(value: Any) -> str:
    """One metadata field as clean text: entities unescaped, whitespace flattened; else ''."""
    if isinstance(value, (list, tuple)):
        return clean_text(" ".join(clean_text(v) for v in value))
    if value is None or isinstance(value, bool):
        return ""
    if isinstance(value, float) and math.isnan(value):
        return ""
    return _WHITESPACE.sub(" ", html.unescape(str(value))).strip()


def first_category_path(categories: Any) -> list[str]:
    """The first category path of ``categories`` (a list of paths, each a list of names)."""
    if not isinstance(categories, (list, tuple)) or not categories:
        return []
    first = categories[0]
    if isinstance(first, (list, tuple)):
        return [clean_text(c) for c in first]
    return [clean_text(c) for c in categories]  # a single flat path


def item_title(meta: Mapping[str, Any] | None) -> str:
    """The item's cleaned title, '' when it has none."""
    return clean_text(meta.get("title")) if meta else ""


def item_text(meta: Mapping[str, Any] | None) -> str:
    """title + brand + first category path + description, space-joined, as MMRec builds it."""
    if not meta:
        return ""
    parts = [
        item_title(meta),
        clean_text(meta.get("brand")),
        *first_category_path(meta.get("categories")),
        clean_text(meta.get("description")),
    ]
    return " ".join(p for p in parts if p)
