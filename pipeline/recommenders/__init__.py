"""Recommenders behind one registry: one module per model in this package, each registering
itself, beside what they share (``base``, ``graph``, ``losses``, ``_channels``).

Adding a model is adding one file here whose class is decorated with
``@register_recommender("name")``, named after the model (dvc.yaml's train stages depend on
``pipeline/recommenders/<model>.py``); a module is imported on its name's first lookup.
"""

from __future__ import annotations

from pipeline.core.registry import Registry
from pipeline.recommenders.base import ItemFeatures, Recommender

__all__ = [
    "ItemFeatures",
    "Recommender",
    "get_recommender",
    "list_recommenders",
    "register_recommender",
]

RECOMMENDERS: Registry[type[Recommender]] = Registry("recommender", Recommender, __name__)
register_recommender = RECOMMENDERS.register
list_recommenders = RECOMMENDERS.names
get_recommender = RECOMMENDERS.get
