"""The contract every recommender follows, its item-feature input and strict configs."""

from __future__ import annotations

import dataclasses
import typing
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from torch import nn

from pipeline.data.interactions import InteractionData

C = TypeVar("C")

# config field type -> the Python types accepted for it (bool is never an int here)
_SCALARS: dict[type, tuple[type, ...]] = {
    bool: (bool,),
    int: (int,),
    float: (int, float),
    str: (str,),
}


@dataclass(frozen=True, eq=False)
class ItemFeatures:
    """Frozen item features from the feature store; row ``i`` belongs to item_id ``i``.

    image: [n_items, d_i] float32 or None; text: [n_items, d_t] float32 or None.
    """

    image: torch.Tensor | None = None
    text: torch.Tensor | None = None

    def __post_init__(self) -> None:
        present = {k: v for k, v in (("image", self.image), ("text", self.text)) if v is not None}
        if not present:
            raise ValueError("ItemFeatures needs at least one of image, text")
        for name, tensor in present.items():
            if tensor.ndim != 2:
                raise ValueError(f"{name} features must be 2-D [n_items, dim], got {tensor.shape}")
        rows = {name: t.shape[0] for name, t in present.items()}
        if len(set(rows.values())) > 1:
            raise ValueError(f"image and text features disagree on the number of items: {rows}")

    @classmethod
    def from_arrays(
        cls,
        item_ids: np.ndarray,
        image: np.ndarray | None,
        text: np.ndarray | None,
        n_items: int,
    ) -> ItemFeatures:
        """Features whose row ``i`` is ``item_ids[i]`` (any order), re-ordered by item id;
        every item in ``range(n_items)`` must appear exactly once."""
        item_ids = np.asarray(item_ids, dtype=np.int64)
        if not np.array_equal(np.sort(item_ids), np.arange(n_items)):
            missing = np.setdiff1d(np.arange(n_items), item_ids)[:5].tolist()
            raise ValueError(
                f"features must cover item ids 0..{n_items - 1} exactly once "
                f"({len(item_ids)} rows; first missing: {missing})"
            )
        order = np.argsort(item_ids)
        image_t, text_t = (
            None if a is None else torch.from_numpy(np.ascontiguousarray(a[order], np.float32))
            for a in (image, text)
        )
        return cls(image=image_t, text=text_t)

    @property
    def n_items(self) -> int:
        """Number of rows (items)."""
        return next(t for t in (self.image, self.text) if t is not None).shape[0]

    def concat(self) -> torch.Tensor:
        """Text and image features side by side, [n_items, d_t + d_i] (MMRec's VBPR order)."""
        return torch.cat([t.float() for t in (self.text, self.image) if t is not None], dim=1)


def config_from_dict(cls: type[C], values: Mapping[str, Any] | C | None, owner: str) -> C:
    """Build the frozen config dataclass ``cls`` from a mapping; unknown keys and wrongly
    typed values raise naming the key and the allowed ones. An instance passes through."""
    if isinstance(values, cls):
        return values
    values = dict(values or {})
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"{owner}: unknown config key(s) {unknown}; allowed: {names}")
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        hint = hints[key]
        if hint not in _SCALARS:
            continue
        if isinstance(value, bool) != (hint is bool) or not isinstance(value, _SCALARS[hint]):
            raise ValueError(f"{owner}: {key} = {value!r} should be {hint.__name__}")
        if hint is float:
            values[key] = float(value)
    return cls(**values)


@dataclass(frozen=True)
class EmbeddingConfig:
    """The knobs every embedding recommender has; each model's config extends this one."""

    embedding_size: int = 64  # MMRec and the LMM4Rec authors' default
    reg_weight: float = 1e-4  # MMRec grid-searches {2, 1, 1e-1, ..., 1e-5}; one mid value

    def __post_init__(self) -> None:
        if self.embedding_size < 1:
            raise ValueError(f"embedding_size = {self.embedding_size}; use at least 1")
        if self.reg_weight < 0:
            raise ValueError(f"reg_weight = {self.reg_weight}; use a value >= 0")


class Recommender(nn.Module, ABC):
    """A recommender: built from the train graph (+ item features), trained with BPR batches.

    Subclasses set ``config_class`` (a frozen dataclass of hyperparameters) and
    ``uses_features``, take ``(data, features, config)`` in ``__init__``, and implement
    ``loss`` and ``score``. The trainer owns sampling, optimisation, masking and ranking.
    Models that propagate over a graph derive from ``GraphRecommender``, which caches the
    propagation for scoring (the trainer calls ``eval()`` before scoring and ``train()`` before
    each epoch).
    """

    uses_features: ClassVar[bool] = False
    config_class: ClassVar[type]
    name: ClassVar[str] = "recommender"  # set by @register_recommender

    def __init__(self, data: InteractionData, features: ItemFeatures | None, config: Any):
        super().__init__()
        self.n_users = data.n_users
        self.n_items = data.n_items
        self.config = config

    @classmethod
    def build(
        cls,
        data: InteractionData,
        features: ItemFeatures | None = None,
        config: Mapping[str, Any] | Any | None = None,
    ) -> Recommender:
        """Check the inputs and construct the model (seed torch first for reproducibility)."""
        cfg = config_from_dict(cls.config_class, config, cls.name)
        if cls.uses_features:
            if features is None:
                raise ValueError(f"{cls.name} uses item features, but none were given")
            if features.n_items != data.n_items:
                raise ValueError(
                    f"{cls.name}: features have {features.n_items} rows, "
                    f"the interactions {data.n_items} items"
                )
        else:
            features = None
        return cls(data, features, cfg)

    @abstractmethod
    def loss(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """Scalar training loss of a batch of (user, positive, negative) ids [B] each,
        including the model's regularisation and auxiliary losses."""

    @abstractmethod
    def score(self, users: torch.Tensor) -> torch.Tensor:
        """Scores of ``users`` [B] against every item, [B, n_items] (higher ranks first)."""

    def set_item_features(self, features: ItemFeatures) -> None:
        """Read ``features`` from now on, through the model's own transform (end-to-end
        training passes tensors whose fresh rows carry the encoder's gradients)."""
        raise NotImplementedError(f"{self.name} cannot swap its item features")

    def check_features(self, features: ItemFeatures, modalities: tuple[str, ...]) -> None:
        """Raise unless ``features`` has this model's items and exactly ``modalities``."""
        present = tuple(m for m in ("image", "text") if getattr(features, m) is not None)
        if features.n_items != self.n_items or sorted(present) != sorted(modalities):
            raise ValueError(
                f"{self.name}: new features have {features.n_items} items and {present}, "
                f"the model was built for {self.n_items} items and {modalities}"
            )

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """The optimiser's parameter groups (one group at ``lr`` unless a model says more)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]

    def after_step(self) -> None:
        """Called after every optimiser step (end-to-end training updates its memory bank)."""

    def saved_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What ``model.pt`` keeps of a state dict (everything unless a model saves elsewhere)."""
        return state


class GraphRecommender(Recommender):
    """A recommender whose embeddings come from one full-graph pass, ``forward()``.

    Scoring uses ``propagated()``: in eval mode the pass runs once without gradients and is
    reused until ``train()`` or ``load_state_dict()`` is called (the weights change then); in
    train mode it reruns.
    """

    def __init__(self, data: InteractionData, features: ItemFeatures | None, config: Any):
        super().__init__(data, features, config)
        self._cache: Any = None
        self.register_load_state_dict_post_hook(_forget_after_load)

    def forget(self) -> None:
        """Drop what was cached from the current weights (the next use recomputes it)."""
        self._cache = None

    def train(self, mode: bool = True) -> GraphRecommender:
        """Switch mode and drop the propagation cached for scoring."""
        self.forget()
        return super().train(mode)

    @abstractmethod
    def forward(self) -> Any:
        """The full-graph pass: the embeddings ``score`` reads."""

    def propagated(self) -> Any:
        """``forward()``, computed once and cached while in eval mode."""
        if self.training:
            return self.forward()
        if self._cache is None:
            with torch.no_grad():
                self._cache = self.forward()
        return self._cache


def _forget_after_load(module: GraphRecommender, incompatible_keys: object) -> None:
    """Loaded weights make whatever was cached from the old ones stale."""
    module.forget()
