"""The small interface every item encoder family implements, and its weights-folder format.

A weights folder (what the ``weights`` and ``finetune`` stages write, e.g.
models/weights/clip-pretrained/)
holds ``model.safetensors`` (the state dict) and ``weights.json``, a card naming the family
(``encoder``), the architecture (``arch``), the weights tag (``pretrained``), the state file's
``sha256``, how the weights were made (``source``) and the preprocessing that travels with them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeAlias

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.core.atomic import atomic_path

log = logging.getLogger(__name__)

BASELINE = "cnn_st"  # the modality-specific baseline family, and its feature set
DEMO_TAG = "demo"  # the ``pretrained`` tag of weights made by our own demo pretraining
WEIGHTS_CARD = "weights.json"
STATE_FILE = "model.safetensors"
CARD_KEYS = ("encoder", "arch", "pretrained", "sha256", "source")

Tokens: TypeAlias = torch.Tensor | Mapping[str, torch.Tensor]
"""A tokenised text batch: ids [B, L], or a dict of [B, L] tensors (ids, attention mask...)."""

Prefix: TypeAlias = dict[str, torch.Tensor]
"""What a tower's lowest blocks hand to the rest for B items: named tensors with the items on
dim 0 (``states``, the token states [B, T, D], plus whatever the upper blocks read: the
attention mask, the token ids that pick the pooled token...)."""


class WeightsError(ValueError):
    """A weights folder is missing, incomplete, or does not match its card."""


class Encoder(nn.Module, ABC):
    """An item encoder: images [B, 3, H, W] -> [B, image_dim], token batches -> [B, text_dim].

    Subclasses live one per file in ``pipeline/encoders/`` behind ``@register_encoder(name)``,
    which sets ``name``. ``arch``, ``pretrained`` and ``source`` are recorded on the card;
    ``weights_sha256`` is the hash of the weights folder the encoder was loaded from or saved
    to (None for weights that exist only in memory). ``image_size``, ``mean`` and ``std`` are
    the square input size and the per-channel normalisation that image-text training applies
    to uint8 pixels (``image_transform`` does the same for one PIL image).

    Families that can be trained on image-text pairs (pretraining, fine-tuning, end to end)
    implement ``pair_losses``; families with hub weights implement ``pin``. Transformer
    families split each tower after block k (``image_prefix``/``image_suffix``, ``text_prefix``/
    ``text_suffix``) so that end-to-end training can cache the output of frozen lower blocks.
    """

    name: ClassVar[str] = ""
    aligned: ClassVar[bool] = True  # image and text embeddings live in one space (comparable)
    image_dim: int
    text_dim: int
    arch: str
    pretrained: str
    source: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_sha256: str | None = None
    demo_arch: ClassVar[str]  # the small arch of the demo's weights (``tiny``)
    _transform: Callable[[Image.Image], torch.Tensor]  # set by the family's __init__
    # what ``freeze_lower_layers`` reads: name prefixes of the input embeddings' parameters and
    # modules, and a pattern whose group 1 is the transformer block index (empty: the family
    # cannot freeze)
    embedding_prefixes: ClassVar[tuple[str, ...]] = ()
    block_pattern: ClassVar[str] = ""
    frozen_layers: int = 0  # set by ``freeze_lower_layers``

    @property
    def image_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """Evaluation preprocessing: a PIL image -> a [3, H, W] float tensor (the family's
        ``_transform``, built from the preprocessing that travels with its weights)."""
        return self._transform

    @abstractmethod
    def tokenize(self, texts: Sequence[str]) -> Tokens:
        """Tokenise a list of strings into a batch ``encode_texts`` accepts (on CPU)."""

    @abstractmethod
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] preprocessed images -> [B, image_dim] embeddings (not normalised)."""

    @abstractmethod
    def encode_texts(self, tokens: Tokens) -> torch.Tensor:
        """A token batch of B texts -> [B, text_dim] embeddings (not normalised)."""

    @abstractmethod
    def card(self) -> dict:
        """What ``weights.json`` records besides the state hash (``CARD_KEYS`` at least, plus
        whatever ``load`` needs to rebuild the model: arch config, preprocessing...)."""

    def weights_state(self) -> Mapping[str, torch.Tensor]:
        """The state dict a weights folder holds (default: this module's own)."""
        return self.state_dict()

    def save(self, out_dir: str | Path) -> None:
        """Write the weights folder (state + card) atomically and remember its sha256."""
        card = write_weights(out_dir, self.weights_state(), self.card())
        self.weights_sha256 = card["sha256"]
        log.info(
            "wrote %s %s weights %s (sha256 %s) to %s",
            self.name, self.arch, self.pretrained, card["sha256"], out_dir,
        )  # fmt: skip

    @classmethod
    @abstractmethod
    def load(cls, weights_dir: str | Path) -> Encoder:
        """Rebuild the encoder from a weights folder, offline."""

    @classmethod
    def tiny(cls) -> Encoder:
        """A small randomly initialised instance, offline (the family's ``demo_arch``): the
        registry's smoke tests use it."""
        return cls.from_arch(cls.demo_arch)

    @classmethod
    def from_arch(cls, arch: str) -> Encoder:
        """``arch`` randomly initialised, offline (seed torch first for a reproducible init)."""
        raise NotImplementedError(f"encoder {cls.name!r} cannot be built from an arch alone")

    @classmethod
    def pin(cls, arch: str, pretrained: str, out_dir: str | Path) -> dict:
        """Fetch published weights ``arch``/``pretrained`` once into a weights folder; the card."""
        raise NotImplementedError(f"encoder {cls.name!r} has no published weights to pin")

    def pair_losses(self, images: torch.Tensor, tokens: Tokens) -> dict[str, torch.Tensor]:
        """The family's image-text objective on B matched pairs: named scalar losses (summed).

        ``images`` are preprocessed [B, 3, image_size, image_size]; row i matches text i.
        """
        raise NotImplementedError(f"encoder {self.name!r} has no image-text training objective")

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters fine-tuning updates (default: all that require grad)."""
        return [p for p in self.parameters() if p.requires_grad]

    def in_prefix(self, name: str, k: int) -> bool:
        """Whether the parameter, buffer or module ``name`` belongs to the input embeddings or
        to the lowest ``k`` blocks of a tower (nothing does for ``k`` = 0)."""
        if k == 0:
            return False
        dotted = name + "."
        block = re.search(self.block_pattern, dotted) if self.block_pattern else None
        return dotted.startswith(self.embedding_prefixes) or (
            block is not None and int(block.group(1)) < k
        )

    def n_blocks(self) -> int:
        """Transformer blocks per tower (the deepest tower's count)."""
        if not self.block_pattern:
            raise ValueError(f"encoder {self.name!r} has no transformer blocks")
        found = [int(m.group(1)) for name, _ in self.named_parameters()
                 if (m := re.search(self.block_pattern, name))]  # fmt: skip
        return max(found) + 1

    def freeze_lower_layers(self, n: int) -> int:
        """Stop training the input embeddings and the lowest ``n`` transformer blocks of every
        tower (``n`` = 0 freezes nothing); returns the number of parameter tensors frozen.

        Frozen layers are a fixed function of the item: they stay in eval mode (no dropout or
        stochastic depth) when the encoder trains, so their outputs can be cached."""
        if n == 0:
            return 0
        if not self.block_pattern:
            raise ValueError(f"encoder {self.name!r} has no transformer blocks to freeze")
        depth = self.n_blocks()
        if not 0 <= n <= depth:
            raise ValueError(f"freeze_layers = {n}; {self.name} {self.arch} has 0..{depth} blocks")
        frozen = 0
        for name, param in self.named_parameters():
            if self.in_prefix(name, n):
                param.requires_grad_(False)
                frozen += 1
        self.frozen_layers = n
        self.train(self.training)
        return frozen

    def train(self, mode: bool = True) -> Encoder:
        """Switch mode; the frozen lower layers stay in eval mode."""
        super().train(mode)
        if mode and self.frozen_layers:
            for name, module in self.named_modules():
                if name and self.in_prefix(name, self.frozen_layers):
                    module.train(False)
        return self

    def image_prefix(self, images: torch.Tensor, k: int) -> Prefix:
        """[B, 3, H, W] preprocessed images through the input embeddings and blocks 0..k-1."""
        raise NotImplementedError(f"encoder {self.name!r} cannot split its image tower")

    def image_suffix(self, prefix: Prefix, k: int) -> torch.Tensor:
        """``image_prefix(images, k)`` through the remaining blocks and the head: [B, image_dim],
        what ``encode_images(images)`` gives."""
        raise NotImplementedError(f"encoder {self.name!r} cannot split its image tower")

    def text_prefix(self, tokens: Tokens, k: int) -> Prefix:
        """A token batch through the input embeddings and blocks 0..k-1."""
        raise NotImplementedError(f"encoder {self.name!r} cannot split its text tower")

    def text_suffix(self, prefix: Prefix, k: int) -> torch.Tensor:
        """``text_prefix(tokens, k)`` through the remaining blocks and the head: [B, text_dim],
        what ``encode_texts(tokens)`` gives."""
        raise NotImplementedError(f"encoder {self.name!r} cannot split its text tower")

    def prefix_tensors(self, k: int) -> dict[str, torch.Tensor]:
        """Every tensor the prefixes up to block ``k`` read: their parameters and the model's
        buffers (constants such as masks and position indices)."""
        named = [(n, p) for n, p in self.named_parameters() if self.in_prefix(n, k)]
        return dict([*named, *self.named_buffers()])

    def prefix_sha256(self, k: int) -> str:
        """Hex SHA-256 of the family, arch, ``k`` and ``prefix_tensors(k)``: equal hashes mean
        equal prefix outputs for equal inputs."""
        digest = hashlib.sha256(f"{self.name}|{self.arch}|{k}".encode())
        for name, tensor in sorted(self.prefix_tensors(k).items()):
            data = tensor.detach().cpu().contiguous()
            digest.update(f"|{name}|{data.dtype}|{tuple(data.shape)}|".encode())
            digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    @property
    def device(self) -> torch.device:
        """Where the encoder's parameters live."""
        return next(self.parameters()).device


PRECISIONS = ("auto", "fp32", "bf16")


def check_precision(precision: str) -> None:
    """Raise unless ``precision`` is one of ``PRECISIONS``."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; allowed: {list(PRECISIONS)}")


def uses_bf16(device: torch.device, precision: str) -> bool:
    """Whether ``precision`` means bf16 on ``device``: ``bf16``, or ``auto`` on CUDA."""
    check_precision(precision)
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """bf16 autocast for ``bf16``, and for ``auto`` on CUDA; otherwise exact float32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(device, precision))


def to_device(tokens: Tokens, device: torch.device) -> Tokens:
    """Move a token batch (a tensor or a dict of tensors) to ``device``."""
    if isinstance(tokens, torch.Tensor):
        return tokens.to(device)
    return {k: v.to(device) for k, v in tokens.items()}


def select_tokens(tokens: Tokens, index: torch.Tensor) -> Tokens:
    """Rows ``index`` of a token batch (a tensor or a dict of tensors)."""
    if isinstance(tokens, torch.Tensor):
        return tokens[index]
    return {k: v[index] for k, v in tokens.items()}


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_weights(out_dir: str | Path, state: Mapping[str, torch.Tensor], card: dict) -> dict:
    """Write ``state`` and ``card`` (plus the sha256 of the state) as a weights folder."""
    missing = [k for k in CARD_KEYS if k != "sha256" and k not in card]
    if missing:
        raise WeightsError(f"weights card lacks {missing}; required keys: {list(CARD_KEYS)}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        save_file(tensors, str(tmp / STATE_FILE))
        card = {**card, "sha256": file_sha256(tmp / STATE_FILE)}
        (tmp / WEIGHTS_CARD).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    return card


def read_card(weights_dir: str | Path) -> dict[str, Any]:
    """Read and check a weights folder's card (without loading the state)."""
    path = Path(weights_dir) / WEIGHTS_CARD
    if not path.is_file():
        raise WeightsError(f"{path} does not exist (has the weights stage run?)")
    card = json.loads(path.read_text())
    missing = [k for k in CARD_KEYS if k not in card]
    if missing:
        raise WeightsError(f"{path} lacks {missing}; required keys: {list(CARD_KEYS)}")
    return card


def read_weights(weights_dir: str | Path, encoder: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a weights folder made for ``encoder``; verify the state file against its sha256."""
    weights_dir = Path(weights_dir)
    card = read_card(weights_dir)
    if card["encoder"] != encoder:
        raise WeightsError(
            f"{weights_dir} holds {card['encoder']!r} weights, expected {encoder!r} weights"
        )
    state_path = weights_dir / STATE_FILE
    if not state_path.is_file():
        raise WeightsError(f"{state_path} does not exist")
    sha = file_sha256(state_path)
    if sha != card["sha256"]:
        raise WeightsError(f"{state_path} has sha256 {sha}, its card says {card['sha256']}")
    return card, load_file(str(state_path))
