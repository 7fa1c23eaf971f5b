"""Dataset sources behind one registry: adding a source is adding one module here.

Each module of this package decorates its ``Source`` subclass with
``@register_source("<name>")``; a params entry ``datasets.<dataset>.source`` names one. Raw
sources (demo, amazon2014, amazon2023) go through the MMRec preprocessing protocol; prepared
ones (mmrec, lattice) keep their own split and turn their ``.npy`` features into ``cnn_st``.
"""

from __future__ import annotations

from pipeline.core.registry import Registry
from pipeline.data.sources.base import Source

SOURCES: Registry[type[Source]] = Registry("source", Source, __name__)
register_source = SOURCES.register
list_sources = SOURCES.names


def get_source(name: str) -> Source:
    """The source registered as ``name``; an unknown name lists the known ones."""
    return SOURCES.get(name)()


__all__ = ["Source", "get_source", "list_sources", "register_source"]
