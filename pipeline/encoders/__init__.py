"""Item encoder families behind one registry, and their training: adding a family is adding
one file here.

Each family module decorates its class with ``@register_encoder("<name>")`` and is named after
it (dvc.yaml's stages depend on ``pipeline/encoders/<name>.py``, and on ``<name>_configs/``
where a family keeps its architectures as data). Modules are imported on first lookup, so that
importing the registry stays cheap and a new family needs no edit anywhere else. Beside the
families: ``base`` (the interface and weights folders), ``pairtrain`` (image-text training),
``pretrain`` (the weights stage), ``cnn_pretrain`` (the baseline's demo pretraining) and
``finetune``.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.registry import Registry
from pipeline.encoders.base import Encoder, read_card

ENCODERS: Registry[type[Encoder]] = Registry("encoder", Encoder, __name__)
register_encoder = ENCODERS.register
list_encoders = ENCODERS.names
get_encoder = ENCODERS.get


def load_encoder(weights_dir: str | Path) -> Encoder:
    """Load whichever encoder family a weights folder's card names, offline."""
    return get_encoder(read_card(weights_dir)["encoder"]).load(weights_dir)


__all__ = ["Encoder", "get_encoder", "list_encoders", "load_encoder", "register_encoder"]
