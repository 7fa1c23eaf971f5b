"""Feature-set and setting names: the one place they are built and parsed.

A feature set is the baseline's ``cnn_st`` or an LMM's ``<encoder>-pretrained`` /
``<encoder>-finetuned``, made from the weights in models/weights/<feature set>/. A setting (a
folder under models/<dataset>/) is a feature set, the end-to-end ``e2e-<encoder>`` or the
ID-only ``id``. dvc.yaml names the stages that make a feature set or train in a setting after
them (``stage`` below).
"""

from __future__ import annotations

import re

from pipeline.encoders.base import BASELINE

ID_ONLY = "id"  # the setting of models that read no item features
LMM_STAGES = ("pretrained", "finetuned")  # an LMM's feature sets, in the paper's order
E2E = "e2e"  # the stage of an LMM trained jointly with a recommender
_SETTING = re.compile(r"^(?:e2e-(?P<e2e>.+)|(?P<encoder>.+)-(?P<stage>pretrained|finetuned))$")


def setting(encoder: str, stage: str) -> str:
    """The setting of the LMM ``encoder`` at ``stage`` (``pretrained``, ``finetuned`` or
    ``e2e``): ``clip-pretrained``, ``e2e-clip``; stage ``cnn_st`` is the baseline's set."""
    if stage == BASELINE:
        return BASELINE
    if stage == E2E:
        return f"{E2E}-{encoder}"
    if stage not in LMM_STAGES:
        raise ValueError(f"unknown stage {stage!r}; allowed: {[BASELINE, *LMM_STAGES, E2E]}")
    return f"{encoder}-{stage}"


def encoder_settings(encoder: str) -> list[str]:
    """The feature settings of the paper's table for the LMM ``encoder``, in column order."""
    return [setting(encoder, stage) for stage in (BASELINE, *LMM_STAGES, E2E)]


def encoder_stage(name: str) -> tuple[str, str] | None:
    """(encoder, stage) of an LMM setting: ``clip-finetuned`` -> ("clip", "finetuned"),
    ``e2e-vlmo`` -> ("vlmo", "e2e"); None for ``cnn_st``, ``id`` and other settings."""
    match = _SETTING.match(name)
    if match is None:
        return None
    if match["e2e"]:
        return match["e2e"], E2E
    return match["encoder"], match["stage"]


def feature_set_of(card: dict) -> str:
    """The feature set a weights folder makes: cnn_st, <lmm>-pretrained or <lmm>-finetuned."""
    if card["encoder"] == BASELINE:
        return BASELINE
    stage = "finetuned" if "+finetuned:" in card["pretrained"] else "pretrained"
    return setting(card["encoder"], stage)


def extract_stage(feature_set: str) -> str:
    """The dvc.yaml stage that makes ``feature_set``."""
    return "extract_baseline" if feature_set == BASELINE else f"extract@{feature_set}"


def train_stage(model: str, feature_set: str, seed: int) -> str:
    """The dvc.yaml stage that trains ``model`` on ``feature_set`` with training ``seed``."""
    if feature_set == ID_ONLY:
        return f"train_id@{model}-{seed}"
    return f"train@{model}-{feature_set}-{seed}"
