"""CLIP through open_clip_torch: image = projected [CLS], text = projected end-of-text token.

Architectures are open_clip model configs: its built-ins (the paper's ``ViT-B-16``) plus ours in
``clip_configs/`` (``lmmrec-clip-tiny``: 64x64 images, patch 16, 4+4 layers of width 128,
128-d embeddings, 32 tokens, open_clip's own BPE tokenizer), registered with
``open_clip.add_model_config`` on import. Weights are a separate axis: the demo's come from
training ``from_arch`` with ``pipeline.encoders.pairtrain``; real ones are pinned once from
open_clip's hub by ``ClipEncoder.pin`` and from then on loaded offline from the weights folder.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import (
    ResidualAttentionBlock,
    Transformer,
    VisionTransformer,
    text_global_pool,
)

from pipeline.encoders import register_encoder
from pipeline.encoders.base import Encoder, Prefix, Tokens, read_weights, write_weights

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).parent / "clip_configs"
DEMO_ARCH = "lmmrec-clip-tiny"
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP caps the ITC inverse temperature at 100
# a text batch runs its blocks in groups of similar length, each cut after its own longest
# text: one more group costs about as much as this many more token rows (demo CLIP on CPU:
# a step's text pass went from ~150 to ~120 ms with 2-4 groups, in line with the tokens saved)
GROUP_COST_ROWS = 128

open_clip.add_model_config(MODEL_CONFIG_DIR)


def check_arch(arch: str) -> None:
    """Raise if open_clip has no model config called ``arch``."""
    if arch not in open_clip.list_models():
        raise ValueError(f"unknown CLIP arch {arch!r}; open_clip knows: {open_clip.list_models()}")


def run_blocks(
    transformer: Transformer, x: torch.Tensor, layers: range, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Blocks ``layers`` of an open_clip ``Transformer`` on batch-first x [B, T, D], as its
    ``forward`` runs them (running 0..k-1 then k..depth-1 is one whole pass)."""
    if not transformer.batch_first:
        x = x.transpose(0, 1)
    for i in layers:
        x = transformer.resblocks[i](x, attn_mask=attn_mask)
    return x if transformer.batch_first else x.transpose(0, 1)


def run_blocks_to_token(
    transformer: Transformer,
    x: torch.Tensor,
    layers: range,
    index: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Blocks ``layers`` on batch-first x [B, T, D], returning only token ``index[b]`` of each
    row [B, D]: the last block computes that token alone (``token_block``), which is all the
    pooled output reads; the others run whole."""
    last = transformer.resblocks[layers[-1]] if layers else None
    if type(last) is not ResidualAttentionBlock:  # no block, or open_clip's custom block
        x = run_blocks(transformer, x, layers, attn_mask)
        return x[torch.arange(len(x), device=x.device), index]
    x = run_blocks(transformer, x, layers[:-1], attn_mask)
    return token_block(last, x, index, attn_mask)


def token_block(
    block: ResidualAttentionBlock,
    x: torch.Tensor,
    index: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Row b's token ``index[b]`` of ``block(x, attn_mask)`` [B, D], for batch-first x [B, T, D].

    Keys and values come from every token (``ln_1`` and their projections), the query, the
    out-projection, both residuals, ``ln_2`` and the MLP from that token alone: the same
    maths as the whole block, on the block's own weights, with its attention dropout."""
    attn, rows = block.attn, torch.arange(len(x), device=x.device)
    b, t, d = x.shape
    heads = attn.num_heads
    h = block.ln_1(x)
    q = F.linear(h[rows, index], attn.in_proj_weight[:d], attn.in_proj_bias[:d])
    k, v = F.linear(h, attn.in_proj_weight[d:], attn.in_proj_bias[d:]).chunk(2, dim=-1)
    q = q.view(b, heads, 1, d // heads)
    k, v = (z.view(b, t, heads, d // heads).transpose(1, 2) for z in (k, v))
    mask = None if attn_mask is None else attn_mask[index].to(q.dtype)[:, None, None, :]
    dropout = attn.dropout if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    y = x[rows, index] + block.ls_1(attn.out_proj(out.reshape(b, d)))
    return y + block.ls_2(block.mlp(block.ln_2(y)))


def pooled_index(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor | None:
    """The position of the token open_clip's text pooling reads in each row of ``ids`` [B, L]
    (asked of ``text_global_pool`` itself, on the positions), or None when it reads them all."""
    positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
    picked = text_global_pool(positions[..., None], ids, model.text_pool_type,
                              eos_token_id=getattr(model, "text_eos_id", None))  # fmt: skip
    return picked[:, 0] if picked.ndim == 2 else None


def length_groups(lengths: torch.Tensor, group_cost: int = GROUP_COST_ROWS) -> list[int]:
    """Cut-offs L_1 < ... < L_g of the row ``lengths`` [B]: group j holds the rows with
    L_{j-1} < length <= L_j and runs cut after L_j positions. Chosen to minimise the token rows
    run (rows x cut-off, summed) plus ``group_cost`` per group: exact, by dynamic programming
    over the distinct lengths."""
    values, counts = torch.unique(lengths, return_counts=True)
    values, below = values.tolist(), [0, *torch.cumsum(counts, 0).tolist()]
    best, cut_from = [0.0], [0]  # best[j]: cheapest split of the j shortest distinct lengths
    for j in range(1, len(values) + 1):
        costs = [best[i] + (below[j] - below[i]) * values[j - 1] for i in range(j)]
        i = min(range(j), key=costs.__getitem__)
        best.append(costs[i] + group_cost)
        cut_from.append(i)
    cuts, j = [], len(values)
    while j:
        cuts.append(values[j - 1])
        j = cut_from[j]
    return cuts[::-1]


@contextmanager
def _quiet_random_init() -> Iterator[None]:
    """Hide open_clip's 'initialized randomly' warning while we build a model to load into."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


@register_encoder("clip")
class ClipEncoder(Encoder):
    """An open_clip ``CLIP`` model with its tokenizer and its evaluation image transform."""

    demo_arch = DEMO_ARCH
    embedding_prefixes = (
        "model.visual.conv1.", "model.visual.class_embedding", "model.visual.positional_embedding",
        "model.visual.patch_dropout.", "model.visual.ln_pre.", "model.token_embedding.",
        "model.positional_embedding",
    )  # fmt: skip
    block_pattern = r"transformer\.resblocks\.(\d+)\."

    def __init__(
        self,
        model: torch.nn.Module,
        arch: str,
        pretrained: str = "none",
        source: str = "random initialisation",
        quick_gelu: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.arch = arch
        self.pretrained = pretrained
        self.source = source
        self.quick_gelu = quick_gelu
        pp = open_clip.get_model_preprocess_cfg(model)
        size = pp["size"]
        self.image_size = size[0] if isinstance(size, tuple | list) and size[0] == size[1] else size
        self.mean = tuple(float(m) for m in pp["mean"])
        self.std = tuple(float(s) for s in pp["std"])
        self.interpolation = pp.get("interpolation", "bicubic")
        self.resize_mode = pp.get("resize_mode", "shortest")
        self.context_length = int(model.context_length)
        self.embed_dim = int(open_clip.get_model_config(arch)["embed_dim"])
        self.image_dim = self.text_dim = self.embed_dim
        self._tokenizer = open_clip.get_tokenizer(arch, context_length=self.context_length)
        self._transform = open_clip.image_transform(
            self.image_size,
            is_train=False,
            mean=self.mean,
            std=self.std,
            resize_mode=self.resize_mode,
            interpolation=self.interpolation,
        )

    @classmethod
    def from_arch(cls, arch: str) -> ClipEncoder:
        """``arch`` randomly initialised (seed torch first for a reproducible init)."""
        check_arch(arch)
        return cls(open_clip.create_model(arch, pretrained=None), arch)

    @property
    def logit_scale(self) -> torch.nn.Parameter:
        """Learnable log of the contrastive (ITC) loss's inverse temperature."""
        return self.model.logit_scale

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> [B, context_length] BPE ids, truncated to the context."""
        return self._tokenizer(list(texts))

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """open_clip's ``encode_image``; a ViT tower runs as prefix and suffix at block 0, so
        that its last block computes the pooled token alone."""
        if not isinstance(self.model.visual, VisionTransformer):
            return self.model.encode_image(images)
        return self.image_suffix(self.image_prefix(images, 0), 0)

    def encode_texts(self, tokens: Tokens) -> torch.Tensor:
        """open_clip's ``encode_text``, as prefix and suffix at block 0 (see ``text_suffix``).
        With a causal tower the rows run in groups of similar length (``length_groups``), each
        cut after its longest pooled token: the same maths on fewer positions. The token
        embedding runs once for the batch (its backward fills a vocabulary-sized gradient)."""
        ids = _ids(tokens)
        lengths = self.pooled_lengths(ids)
        if lengths is None:
            return self.text_suffix(self.text_prefix(ids, 0), 0)
        ids = ids[:, : int(lengths.max())]
        states = self.text_prefix(ids, 0)["states"]
        parts, rows, shorter = [], [], 0
        for cut in length_groups(lengths):
            group = ((lengths > shorter) & (lengths <= cut)).nonzero()[:, 0]
            prefix = {"states": states[group, :cut], "ids": ids[group, :cut]}
            parts.append(self.text_suffix(prefix, 0))
            rows.append(group)
            shorter = cut
        if len(parts) == 1:
            return parts[0]
        return torch.cat(parts)[torch.argsort(torch.cat(rows))]  # back in the batch's order

    def pooled_lengths(self, ids: torch.Tensor) -> torch.Tensor | None:
        """Per row of ``ids`` [B, L], how many leading positions its pooled text output depends
        on (its pooled token's position + 1) when the text tower is causal and pools one token
        (later positions, padding, are never attended to by it); else None (all L)."""
        model = self.model
        mask = model.attn_mask
        index = pooled_index(model, ids)
        if mask is None or index is None or len(ids) == 0:
            return None
        causal = torch.ones(mask.shape, dtype=torch.bool, device=mask.device).triu(1)
        if not torch.equal(torch.isinf(mask) & (mask < 0), causal):
            return None
        return index + 1

    def causal_length(self, ids: torch.Tensor) -> int:
        """How many leading positions of ``ids`` [B, L] the batch's pooled outputs depend on:
        up to its last pooled token (``pooled_lengths``), else all L."""
        lengths = self.pooled_lengths(ids)
        return ids.shape[1] if lengths is None else int(lengths.max())

    def _visual(self) -> VisionTransformer:
        """The image tower, if it is open_clip's ViT (the only one that splits into blocks)."""
        visual = self.model.visual
        if not isinstance(visual, VisionTransformer):
            raise ValueError(f"CLIP {self.arch}: a {type(visual).__name__} image tower does not "
                             "split into transformer blocks")  # fmt: skip
        return visual

    def image_prefix(self, images: torch.Tensor, k: int) -> Prefix:
        """Patch, class and position embeddings (``ln_pre``), then ViT blocks 0..k-1."""
        visual = self._visual()
        return {"states": run_blocks(visual.transformer, visual._embeds(images), range(k))}

    def image_suffix(self, prefix: Prefix, k: int) -> torch.Tensor:
        """ViT blocks k.., the pooling with ``ln_post`` and the projection, as ``forward``. With
        class-token pooling (``pool_type`` 'tok', no attentional pooler) the last block and
        ``ln_post`` compute the class token alone; other poolings read every token."""
        visual, states = self._visual(), prefix["states"]
        blocks = range(k, len(visual.transformer.resblocks))
        if visual.attn_pool is None and visual.pool_type == "tok":
            first = torch.zeros(len(states), dtype=torch.long, device=states.device)
            pooled = visual.ln_post(run_blocks_to_token(visual.transformer, states, blocks, first))
        else:
            pooled, _ = visual._pool(run_blocks(visual.transformer, states, blocks))
        return pooled if visual.proj is None else pooled @ visual.proj

    def text_prefix(self, tokens: Tokens, k: int) -> Prefix:
        """Token and position embeddings, then causal text blocks 0..k-1; the ids travel along
        (they pick the pooled end-of-text token)."""
        ids, model = _ids(tokens), self.model
        cast = model.transformer.get_cast_dtype()
        length = ids.shape[1]
        x = model.token_embedding(ids).to(cast) + model.positional_embedding[:length].to(cast)
        mask = _square(model.attn_mask, length)
        return {"states": run_blocks(model.transformer, x, range(k), mask), "ids": ids}

    def text_suffix(self, prefix: Prefix, k: int) -> torch.Tensor:
        """Text blocks k.., ``ln_final``, the end-of-text pooling and the projection, as
        open_clip's ``encode_text``; the last block and ``ln_final`` compute the pooled token
        alone (its query attends to the positions the causal mask leaves it), and positions
        after the batch's last pooled token are dropped (``causal_length``)."""
        model, states, ids = self.model, prefix["states"], prefix["ids"]
        length = self.causal_length(ids)
        states, ids = states[:, :length], ids[:, :length]
        mask = _square(model.attn_mask, length)
        blocks = range(k, len(model.transformer.resblocks))
        index = pooled_index(model, ids)
        if index is not None:
            x = model.ln_final(run_blocks_to_token(model.transformer, states, blocks, index, mask))
        else:
            x = model.ln_final(run_blocks(model.transformer, states, blocks, mask))
            x = text_global_pool(x, ids, model.text_pool_type,
                                 eos_token_id=getattr(model, "text_eos_id", None))  # fmt: skip
        if model.text_projection is None:
            return x
        if isinstance(model.text_projection, torch.nn.Linear):
            return model.text_projection(x)
        return x @ model.text_projection

    def pair_losses(self, images: torch.Tensor, tokens: Tokens) -> dict[str, torch.Tensor]:
        """CLIP's symmetric InfoNCE (ITC) over the batch, temperature learnt and capped."""
        img = F.normalize(self.encode_images(images), dim=-1)
        txt = F.normalize(self.encode_texts(tokens), dim=-1)
        scale = self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
        logits = scale * img @ txt.T
        target = torch.arange(len(logits), device=logits.device)
        itc = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        return {"itc": itc}

    @classmethod
    def pin(cls, arch: str, pretrained: str, out_dir: str | Path) -> dict:
        return pin_open_clip_weights(arch, pretrained, out_dir)

    def card(self) -> dict:
        """What ``weights.json`` records besides the state hash."""
        return {
            "encoder": self.name,
            "arch": self.arch,
            "pretrained": self.pretrained,
            "source": self.source,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "resize_mode": self.resize_mode,
            "context_length": self.context_length,
            "embed_dim": self.embed_dim,
            "quick_gelu": self.quick_gelu,
            "open_clip_version": open_clip.__version__,
        }

    def weights_state(self) -> dict[str, torch.Tensor]:
        """open_clip's own state dict (keys without our wrapper's ``model.`` prefix)."""
        return self.model.state_dict()

    @classmethod
    def load(cls, weights_dir: str | Path) -> ClipEncoder:
        card, state = read_weights(weights_dir, cls.name)
        check_arch(card["arch"])
        preprocess = {
            k: card[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in card
        }
        with _quiet_random_init():
            model = open_clip.create_model(
                card["arch"],
                pretrained=None,
                force_quick_gelu=card.get("quick_gelu", False),
                force_image_size=card.get("image_size"),
                force_context_length=card.get("context_length"),
                force_preprocess_cfg=preprocess,
            )
        model.load_state_dict(state, strict=True)
        encoder = cls(
            model,
            card["arch"],
            pretrained=card["pretrained"],
            source=card["source"],
            quick_gelu=card.get("quick_gelu", False),
        )
        encoder.weights_sha256 = card["sha256"]
        return encoder.eval()


def _square(mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """The leading ``length`` x ``length`` block of an attention mask (None stays None)."""
    return None if mask is None else mask[:length, :length]


def _ids(tokens: Tokens) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"CLIP takes a [B, L] tensor of token ids, got {type(tokens)}")
    return tokens


def pin_open_clip_weights(
    arch: str, tag: str, out_dir: str | Path, cache_dir: str | None = None
) -> dict:
    """Download open_clip's weights ``arch``:``tag`` (hash-checked by open_clip) into a folder.

    Needs network access; run once, e.g. ``ViT-B-16``/``openai`` (the paper's). Returns the card.
    """
    check_arch(arch)
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if tag not in tags:
        raise ValueError(f"unknown pretrained tag {tag!r} for CLIP arch {arch!r}; known: {tags}")
    tag_cfg = open_clip.get_pretrained_cfg(arch, tag)
    quick_gelu = bool(tag_cfg.get("quick_gelu", False))
    model = open_clip.create_model(
        arch,
        pretrained=tag,
        force_quick_gelu=quick_gelu,
        cache_dir=cache_dir,
        require_pretrained=True,
    )
    where = tag_cfg.get("hf_hub") or tag_cfg.get("url") or "?"
    source = f"open_clip {open_clip.__version__} pretrained {arch}:{tag} ({where})"
    encoder = ClipEncoder(model, arch, pretrained=tag, source=source, quick_gelu=quick_gelu)
    return write_weights(out_dir, model.state_dict(), encoder.card())
