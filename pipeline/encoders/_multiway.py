"""VLMo's Multiway Transformer in plain torch, with the official module names and state-dict keys.

Written from the official code (microsoft/unilm, ``vlmo/vlmo/modules``: ``multiway_transformer.py``,
``vlmo_module.py``, ``heads.py``): one self-attention shared by every modality, and per layer a
vision FFN (``norm2_imag``/``mlp_imag``) and a language FFN (``norm2_text``/``mlp_text``), plus
a vision-language FFN (``norm2_vl``/``mlp_vl``) from layer ``vlffn_start_layer`` (0-based) on.
Attention has a bias-free ``qkv`` weight with separate ``q_bias`` and ``v_bias`` (no k bias).
Base and large share one relative-position-bias table across layers, image, text and cross
distances, and scale each residual branch by a learned ``gamma`` (layer scale); base-plus uses an
absolute image position embedding instead and has neither. Text tokens get an absolute position
embedding only where there is no relative bias (BERT's embedding module is built either way, so
its ``position_embeddings`` weight is always in the state dict). Sequences are ``[text; image]``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

TEXT, IMAGE, VL = "text", "image", "vl"
LN_EPS = 1e-6  # the transformer's LayerNorms
BERT_LN_EPS = 1e-12  # BERT's LayerNorms (text embeddings, MLM head)
INIT_STD = 0.02


@dataclass(frozen=True)
class VlmoArch:
    """A VLMo architecture: what a ``vlmo_configs/<arch>.json`` file holds (defaults = base)."""

    image_size: int = 224  # square input side
    patch_size: int = 16
    embed_dim: int = 768  # width; also the size of the ITC projections
    depth: int = 12  # layers
    num_heads: int = 12
    mlp_ratio: float = 4.0
    vlffn_start_layer: int = 10  # 0-based index of the first layer with a VL-FFN
    relative_position_bias: bool = True  # base/large: shared relative bias table, no text abs pos
    abs_pos_emb: bool = False  # base-plus: absolute image position embedding
    layer_scale_init: float | None = 0.1  # gamma_1/gamma_2 init; None: no layer scale
    max_text_len: int = 40  # every text is padded/truncated to this many tokens
    max_text_len_of_initckpt: int = 196  # sizes the text part of the relative bias table
    vocab_size: int = 30522  # BERT-uncased WordPiece
    drop_path_rate: float = 0.1  # stochastic depth (linear over layers); also BERT's dropout

    def __post_init__(self) -> None:
        problems = []
        if self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} is not a multiple of patch_size")
        if self.embed_dim % self.num_heads:
            problems.append(f"embed_dim {self.embed_dim} is not a multiple of num_heads")
        if not 1 <= self.vlffn_start_layer < self.depth:
            problems.append(f"vlffn_start_layer must be in [1, depth - 1 = {self.depth - 1}]")
        if self.relative_position_bias and not 2 <= self.max_text_len <= (
            self.max_text_len_of_initckpt
        ):
            problems.append("max_text_len must be in [2, max_text_len_of_initckpt]")
        if not 0 <= self.drop_path_rate < 1:
            problems.append("drop_path_rate must be in [0, 1)")
        if problems:
            raise ValueError(f"invalid VLMo arch {self}: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, values: dict) -> VlmoArch:
        """Build from a JSON dict; unknown keys raise, naming the allowed ones."""
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise ValueError(f"unknown VLMo arch keys {unknown}; allowed: {allowed}")
        return cls(**values)

    def to_dict(self) -> dict:
        """The JSON form (what a weights card records)."""
        return asdict(self)

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def image_tokens(self) -> int:
        """Image sequence length: [CLS] + patches."""
        return self.grid**2 + 1


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a residual branch per sample with probability p, rescale the rest."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (one FFN expert)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention: bias-free qkv weight, learned q and v biases, no k bias."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None, first_only: bool = False
    ) -> torch.Tensor:
        """x [B, T, D]; attn_mask additive, broadcastable to [B, H, T, T] -> [B, T, D]. With
        ``first_only`` only the first token's query is computed: [B, 1, D] (keys and values
        still come from every token)."""
        b, t, d = x.shape
        kv_bias = torch.cat((torch.zeros_like(self.v_bias), self.v_bias))
        if first_only:
            q = F.linear(x[:, :1], self.qkv.weight[:d], self.q_bias)
            kv = F.linear(x, self.qkv.weight[d:], kv_bias)
            attn_mask = None if attn_mask is None else attn_mask[..., :1, :]
        else:
            qkv = F.linear(x, self.qkv.weight, torch.cat((self.q_bias, kv_bias)))
            q, kv = qkv[..., :d], qkv[..., d:]
        q = q.reshape(b, -1, self.num_heads, d // self.num_heads).transpose(1, 2)
        k, v = kv.reshape(b, t, 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # [B, H, T, D/H]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(b, -1, d))


class Block(nn.Module):
    """Shared attention, then the FFN expert of the modality (V, L, or VL where present)."""

    def __init__(self, arch: VlmoArch, with_vlffn: bool, drop_path_rate: float) -> None:
        super().__init__()
        dim, hidden = arch.embed_dim, int(arch.embed_dim * arch.mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, arch.num_heads)
        self.norm2_text = nn.LayerNorm(dim, eps=LN_EPS)
        self.norm2_imag = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp_text = Mlp(dim, hidden)
        self.mlp_imag = Mlp(dim, hidden)
        self.mlp_vl = Mlp(dim, hidden) if with_vlffn else None
        self.norm2_vl = nn.LayerNorm(dim, eps=LN_EPS) if with_vlffn else None
        scale = arch.layer_scale_init
        self.gamma_1 = nn.Parameter(torch.full((dim,), scale)) if scale is not None else None
        self.gamma_2 = nn.Parameter(torch.full((dim,), scale)) if scale is not None else None
        self.drop_path_rate = drop_path_rate
        self.max_text_len = arch.max_text_len

    def _branch(self, x: torch.Tensor, gamma: nn.Parameter | None) -> torch.Tensor:
        x = x if gamma is None else gamma * x
        return drop_path(x, self.drop_path_rate, self.training)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None,
        modality: str,
        first_only: bool = False,
    ) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]; ``modality`` picks the FFN: text, image or vl. With
        ``first_only``, the first token's output alone [B, 1, D] (attention reads every token;
        stochastic depth draws the same per-sample masks as the whole block)."""
        attended = self.attn(self.norm1(x), attn_mask, first_only)
        x = (x[:, :1] if first_only else x) + self._branch(attended, self.gamma_1)
        if modality == IMAGE:
            return x + self._branch(self.mlp_imag(self.norm2_imag(x)), self.gamma_2)
        if modality == TEXT:
            return x + self._branch(self.mlp_text(self.norm2_text(x)), self.gamma_2)
        if self.mlp_vl is not None:
            return x + self._branch(self.mlp_vl(self.norm2_vl(x)), self.gamma_2)
        text, image = x[:, : self.max_text_len], x[:, self.max_text_len :]
        text = text + self._branch(self.mlp_text(self.norm2_text(text)), self.gamma_2)
        image = image + self._branch(self.mlp_imag(self.norm2_imag(image)), self.gamma_2)
        return torch.cat([text, image], dim=1)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens, by a strided convolution."""

    def __init__(self, arch: VlmoArch) -> None:
        super().__init__()
        self.image_size = arch.image_size
        p = arch.patch_size
        self.proj = nn.Conv2d(3, arch.embed_dim, kernel_size=p, stride=p)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, (S/p)^2, D]."""
        if images.ndim != 4 or images.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(
                f"VLMo takes images [B, 3, {self.image_size}, {self.image_size}], "
                f"got {tuple(images.shape)}"
            )
        return self.proj(images).flatten(2).transpose(1, 2)


class MultiwayTransformer(nn.Module):
    """The backbone (``transformer.*`` in the official state dict)."""

    def __init__(self, arch: VlmoArch) -> None:
        super().__init__()
        dim = arch.embed_dim
        self.patch_embed = PatchEmbed(arch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = (
            nn.Parameter(torch.zeros(1, arch.image_tokens, dim)) if arch.abs_pos_emb else None
        )
        rates = [arch.drop_path_rate * i / max(arch.depth - 1, 1) for i in range(arch.depth)]
        self.blocks = nn.ModuleList(
            Block(arch, i >= arch.vlffn_start_layer, rates[i]) for i in range(arch.depth)
        )
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)

    def visual_embed(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, 1 + (S/p)^2, D]: [CLS] then patches (+ absolute positions)."""
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x if self.pos_embed is None else x + self.pos_embed


class TextEmbeddings(nn.Module):
    """BERT's embedding module (``text_embeddings.*``): words + BERT token type (+ positions)."""

    def __init__(self, arch: VlmoArch) -> None:
        super().__init__()
        dim, n = arch.embed_dim, arch.max_text_len
        self.word_embeddings = nn.Embedding(arch.vocab_size, dim, padding_idx=0)
        self.position_embeddings = nn.Embedding(n, dim)
        self.token_type_embeddings = nn.Embedding(2, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=BERT_LN_EPS)
        self.dropout = nn.Dropout(arch.drop_path_rate)
        self.register_buffer("position_ids", torch.arange(n).expand(1, -1), persistent=True)
        self.absolute = not arch.relative_position_bias

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, L] ids -> [B, L, D]."""
        x = self.word_embeddings(ids) + self.token_type_embeddings.weight[0]
        if self.absolute:
            x = x + self.position_embeddings(self.position_ids[:, : ids.shape[1]])
        return self.dropout(self.LayerNorm(x))


class Pooler(nn.Module):
    """tanh(dense(first token)): the fused [CLS] that the ITM head reads."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, 0]))


class LinearHead(nn.Module):
    """One linear layer named ``fc`` (the ITC projections and the ITM head)."""

    def __init__(self, dim: int, out: int, bias: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class PredictionTransform(nn.Module):
    """BERT's MLM head transform: dense -> GELU -> LayerNorm."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=BERT_LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class MLMHead(nn.Module):
    """Masked-token prediction over the vocabulary (decoder not tied to the word embeddings)."""

    def __init__(self, dim: int, vocab_size: int) -> None:
        super().__init__()
        self.transform = PredictionTransform(dim)
        self.decoder = nn.Linear(dim, vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x)) + self.bias


def relative_position_table_size(arch: VlmoArch) -> int:
    """Rows of the shared relative position bias table."""
    return (2 * arch.grid - 1) ** 2 + 3 + 2 * arch.max_text_len_of_initckpt + 2


def relative_position_indices(arch: VlmoArch) -> dict[str, torch.Tensor]:
    """Index maps into the shared bias table: image [N, N], text [L, L], text+image [L+N]^2.

    Image: BEiT's 2-D relative offsets, plus three slots for [CLS]->patch, patch->[CLS] and
    [CLS]->[CLS]. Text: 1-D offsets between non-[CLS] tokens, plus three [CLS] slots at the end
    of the table. Text->image and image->text are one slot each.
    """
    g, n_text = arch.grid, arch.max_text_len
    n_image_dist = (2 * g - 1) ** 2 + 3
    n_all = relative_position_table_size(arch)
    coords = torch.stack(torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (g - 1)  # [g², g², 2]
    image = torch.zeros(g * g + 1, g * g + 1, dtype=torch.long)
    image[1:, 1:] = rel[..., 0] * (2 * g - 1) + rel[..., 1]
    image[0, :], image[:, 0], image[0, 0] = n_image_dist - 3, n_image_dist - 2, n_image_dist - 1
    pos = torch.arange(n_text - 1)
    text = torch.zeros(n_text, n_text, dtype=torch.long)
    offset = n_image_dist + 2 + arch.max_text_len_of_initckpt - 2
    text[1:, 1:] = pos[None, :] - pos[:, None] + offset
    text[0, :], text[:, 0], text[0, 0] = n_all - 3, n_all - 2, n_all - 1
    n_image = image.shape[0]
    text_to_image = torch.full((n_text, n_image), n_image_dist, dtype=torch.long)
    image_to_text = torch.full((n_image, n_text), n_image_dist + 1, dtype=torch.long)
    both = torch.cat([torch.cat([text, text_to_image], 1), torch.cat([image_to_text, image], 1)], 0)
    return {
        "relative_position_index": image,
        "text_relative_position_index": text,
        "text_imag_relative_position_index": both,
    }


def init_weights(module: nn.Module) -> None:
    """Normal(0, 0.02) linear and embedding weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, std=INIT_STD)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class VlmoModel(nn.Module):
    """The VLMo module with every pretraining head; its state dict uses the official keys."""

    def __init__(self, arch: VlmoArch) -> None:
        super().__init__()
        self.arch = arch
        dim = arch.embed_dim
        self.transformer = MultiwayTransformer(arch)
        for module in self.transformer.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for p in (self.transformer.cls_token, self.transformer.pos_embed):
            if p is not None:
                nn.init.trunc_normal_(p, std=INIT_STD)
        self.relative_position_bias_table = None
        if arch.relative_position_bias:
            self.relative_position_bias_table = nn.Parameter(
                torch.zeros(relative_position_table_size(arch), arch.num_heads * arch.depth)
            )
            for name, tensor in relative_position_indices(arch).items():
                self.register_buffer(name, tensor, persistent=False)
        self.text_embeddings = TextEmbeddings(arch)
        self.token_type_embeddings = nn.Embedding(2, dim)  # 0: text, 1: image
        self.pooler = Pooler(dim)
        self.mlm_score = MLMHead(dim, arch.vocab_size)
        self.itm_score = LinearHead(dim, 2, bias=True)
        self.itc_text_proj = LinearHead(dim, dim, bias=False)
        self.itc_image_proj = LinearHead(dim, dim, bias=False)
        self.itc_vl_text_proj = LinearHead(dim, dim, bias=False)
        self.itc_vl_image_proj = LinearHead(dim, dim, bias=False)
        for name, module in self.named_children():
            if name != "transformer":
                module.apply(init_weights)
        self.logit_scale = nn.Parameter(torch.tensor(1 / 0.07).log())
        self.logit_vl_scale = nn.Parameter(torch.tensor(1 / 0.07).log())

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, L] ids (L = max_text_len) -> [B, L, D] with the text modality embedding."""
        if ids.ndim != 2 or ids.shape[1] != self.arch.max_text_len:
            raise ValueError(
                f"VLMo takes token ids [B, {self.arch.max_text_len}] (padded to max_text_len), "
                f"got {tuple(ids.shape)}"
            )
        return self.text_embeddings(ids) + self.token_type_embeddings.weight[0]

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, N, D] with the image modality embedding."""
        return self.transformer.visual_embed(images) + self.token_type_embeddings.weight[1]

    def _biases(self, index_name: str) -> list[torch.Tensor | None]:
        """Per-layer relative position bias [H, T, T] for one of the index maps (or Nones)."""
        if self.relative_position_bias_table is None:
            return [None] * self.arch.depth
        index = getattr(self, index_name)
        bias = F.embedding(index, self.relative_position_bias_table).permute(2, 0, 1)
        return list(bias.chunk(self.arch.depth, dim=0))

    def _run(
        self,
        x: torch.Tensor,
        pad: torch.Tensor | None,
        modality: str,
        biases: list[torch.Tensor | None],
        layers: range,
        first_only: bool = False,
    ) -> torch.Tensor:
        """Run ``layers`` on x [B, T, D]; ``pad`` [B, T] (1 = real token) masks keys. With
        ``first_only`` the last of ``layers`` computes the first token alone: [B, 1, D]."""
        key_mask = None
        if pad is not None:
            blocked = torch.zeros(pad.shape, dtype=x.dtype, device=x.device)
            blocked = blocked.masked_fill(~pad.bool(), torch.finfo(x.dtype).min)
            key_mask = blocked[:, None, None, :]
        for i in layers:
            bias = biases[i]
            if bias is not None:
                bias = bias.unsqueeze(0).to(x.dtype)
            mask = bias if key_mask is None else key_mask if bias is None else bias + key_mask
            x = self.transformer.blocks[i](x, mask, modality, first_only and i == layers[-1])
        return x

    def _unimodal_biases(self, modality: str) -> list[torch.Tensor | None]:
        index = "relative_position_index" if modality == IMAGE else "text_relative_position_index"
        return self._biases(index)

    def unimodal_layers(
        self,
        x: torch.Tensor,
        pad: torch.Tensor | None,
        modality: str,
        layers: range,
        first_only: bool = False,
    ) -> torch.Tensor:
        """Layers ``layers`` of the image-only or text-only pass (the modality's own FFN), not
        normed: layers 0..k-1 then k..depth-1 make ``unimodal``'s pass before its final norm.
        ``first_only``: the last layer computes the [CLS] alone, [B, 1, D] (what ITC reads)."""
        biases = self._unimodal_biases(modality)
        return self._run(x, pad, modality, biases, layers, first_only)

    def unimodal(
        self, x: torch.Tensor, pad: torch.Tensor | None, modality: str, with_vl: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image-only or text-only pass: final-normed states through the modality's own FFN in
        every layer, and (``with_vl``) through the VL-FFN from ``vlffn_start_layer`` on."""
        biases = self._unimodal_biases(modality)
        start, depth = self.arch.vlffn_start_layer, self.arch.depth
        below = self._run(x, pad, modality, biases, range(start))
        top = self._run(below, pad, modality, biases, range(start, depth))
        vl = self._run(below, pad, VL, biases, range(start, depth)) if with_vl else None
        norm = self.transformer.norm
        return norm(top), (norm(vl) if vl is not None else None)

    def fused(self, text: torch.Tensor, pad: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Image+text pass on embedded [B, L, D] text and [B, N, D] image: [B, L + N, D] normed."""
        x = torch.cat([text, image], dim=1)
        pad = torch.cat([pad, pad.new_ones(image.shape[:2])], dim=1)
        biases = self._biases("text_imag_relative_position_index")
        x = self._run(x, pad, VL, biases, range(self.arch.depth))
        return self.transformer.norm(x)
