"""Readers for the Amazon 2014 raw formats: JSON-lines reviews and Python-literal metadata.

Malformed lines are counted, never fatal: each reader fills a ``LineStats`` the caller reports.
"""

from __future__ import annotations

import ast
import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

FEATURE_DIM = 4096  # the published image features (.b files): per item a 10-byte ASIN, then
ASIN_BYTES = 10  # 4096 little-endian float32
FEATURE_RECORD_BYTES = ASIN_BYTES + 4 * FEATURE_DIM


@dataclass
class LineStats:
    """How many lines a reader saw, and which ones it had to skip."""

    read: int = 0
    malformed: int = 0
    examples: list[str] = field(default_factory=list)  # a few line numbers + reasons

    def skip(self, lineno: int, reason: str) -> None:
        self.malformed += 1
        if len(self.examples) < 5:
            self.examples.append(f"line {lineno}: {reason}")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if line:
                yield lineno, line


def json_lines(path: str | Path, stats: LineStats) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each line of a JSON-lines file holding a JSON object."""
    for lineno, line in _lines(Path(path)):
        stats.read += 1
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            stats.skip(lineno, f"not JSON ({exc.msg})")
            continue
        if not isinstance(rec, dict):
            stats.skip(lineno, "not a JSON object")
            continue
        yield lineno, rec


def iter_reviews(path: str | Path, stats: LineStats | None = None) -> Iterator[dict]:
    """Yield review dicts (one JSON object a line) that carry reviewerID and asin."""
    stats = stats if stats is not None else LineStats()
    for lineno, rec in json_lines(path, stats):
        if not rec.get("reviewerID") or not rec.get("asin"):
            stats.skip(lineno, "no reviewerID/asin")
            continue
        yield rec


def iter_meta(path: str | Path, stats: LineStats | None = None) -> Iterator[dict]:
    """Yield metadata dicts; the 2014 files hold one Python dict literal a line.

    Parsed with ``ast.literal_eval`` (never ``eval``); strict JSON lines are accepted too.
    """
    stats = stats if stats is not None else LineStats()
    for lineno, line in _lines(Path(path)):
        stats.read += 1
        try:
            rec = ast.literal_eval(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                stats.skip(lineno, "neither a Python literal nor JSON")
                continue
        if not isinstance(rec, dict) or not rec.get("asin"):
            stats.skip(lineno, "not a dict with an asin")
            continue
        yield rec
