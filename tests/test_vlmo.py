"""The VLMo family: architectures, official key names and counts, checkpoint pinning, objective."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pipeline.encoders import get_encoder, load_encoder
from pipeline.encoders._multiway import VlmoArch, VlmoModel, relative_position_indices
from pipeline.encoders.base import STATE_FILE, WeightsError, read_card
from pipeline.encoders.vlmo import (
    DEMO_ARCH,
    VlmoEncoder,
    _sample_negatives,
    add_arch_config,
    arch_config,
    list_archs,
)

torch.set_num_threads(1)

# A small base-like arch (relative position bias, layer scale, VL-FFN in the last layer), to
# exercise the variant of the official base and large checkpoints next to the base-plus-like tiny.
REL_ARCH = "test-vlmo-relbias"
REL_CFG = {
    "image_size": 32,
    "patch_size": 8,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
    "vlffn_start_layer": 1,
    "relative_position_bias": True,
    "abs_pos_emb": False,
    "layer_scale_init": 0.1,
    "max_text_len": 40,
    "max_text_len_of_initckpt": 40,
    "drop_path_rate": 0.0,
}
TEXTS = ["a red cotton shirt by acme", "", "blue leather shoes " * 20, "a green mug, ceramic"]
# Published sizes (VLMo README): base 175M, base-plus 167M, large 562M.
PUBLISHED = {
    "vlmo_base_patch16_224": 175,
    "vlmo_base_plus_patch16_224": 167,
    "vlmo_large_patch16_224": 562,
}


class FakeLightningConfig(dict):
    """Stands for the foreign classes of a Lightning checkpoint (sacred/Lightning containers)."""


class FakeCallback:
    pass


@pytest.fixture(scope="module")
def rel_arch(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("vlmo_configs") / f"{REL_ARCH}.json"
    path.write_text(json.dumps(REL_CFG))
    add_arch_config(path)
    return REL_ARCH


def _images(encoder: VlmoEncoder, n: int = 4) -> torch.Tensor:
    colours = ["red", "green", "blue", "yellow", "black", "white"]
    return torch.stack(
        [encoder.image_transform(Image.new("RGB", (70, 50), colours[i % 6])) for i in range(n)]
    )


def _lightning_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` as the official releases are: a Lightning checkpoint dict."""
    torch.save(
        {
            "epoch": 3,
            "global_step": 1000,
            "pytorch-lightning_version": "1.5.5",
            "state_dict": state,
            "hyper_parameters": {"config": FakeLightningConfig(max_text_len=40)},
            "callbacks": {FakeCallback: {"best_model_score": torch.tensor(0.5)}},
        },
        path,
    )


def _official_state(arch: str, seed: int = 0) -> tuple[VlmoEncoder, dict]:
    torch.manual_seed(seed)
    encoder = VlmoEncoder.from_arch(arch).eval()
    for p in encoder.model.parameters():  # no zero-initialised tensor hides a mis-loaded one
        with torch.no_grad():
            p.add_(torch.randn_like(p) * 0.02)
    return encoder, {k: v.clone() for k, v in encoder.model.state_dict().items()}


def _assert_same_outputs(a: VlmoEncoder, b: VlmoEncoder) -> None:
    images, tokens = _images(a), a.tokenize(TEXTS)
    with torch.inference_mode():
        assert torch.equal(a.encode_images(images), b.encode_images(images))
        assert torch.equal(a.encode_texts(tokens), b.encode_texts(tokens))


class _Server:
    """Serves ``files`` by path (query strings ignored) on 127.0.0.1; anything else is 404."""

    def __init__(self, files: dict[str, bytes]) -> None:
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                body = files.get(self.path.split("?")[0])
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_registry_and_archs():
    assert get_encoder("vlmo") is VlmoEncoder
    assert {DEMO_ARCH, *PUBLISHED} <= set(list_archs())
    with pytest.raises(ValueError, match=r"unknown VLMo arch 'vlmo_huge'.*vlmo_base_patch16_224"):
        VlmoEncoder.from_arch("vlmo_huge")
    with pytest.raises(ValueError, match=r"unknown VLMo arch keys \['width'\].*embed_dim"):
        VlmoArch.from_dict({"width": 10})
    with pytest.raises(ValueError, match="vlffn_start_layer"):
        VlmoArch(depth=4, vlffn_start_layer=4)


def test_tokenizer_is_bert_uncased_and_truncates():
    encoder = VlmoEncoder.tiny()
    tokens = encoder.tokenize(TEXTS)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    assert set(tokens) == {"input_ids", "attention_mask"}
    assert ids.shape == mask.shape == (4, 40) and ids.dtype == torch.long
    assert (ids[:, 0] == 101).all()  # [CLS]
    assert ids[1, 1:3].tolist() == [102, 0] and mask[1].tolist() == [1, 1] + [0] * 38  # "" + pad
    assert mask[2].all() and ids[2, -1] == 102  # truncated to 40, still closed by [SEP]
    assert ids[0, 2].item() == 2417  # "red", lower-cased WordPiece id of bert-base-uncased
    upper = encoder.tokenize(["A RED Cotton"])["input_ids"][0, :4]
    assert upper.tolist() == [101, 1037, 2417, 6557]


def test_image_transform_and_card_preprocessing(tmp_path):
    torch.manual_seed(0)
    encoder = VlmoEncoder.tiny()
    x = encoder.image_transform(Image.new("RGB", (120, 64), (255, 0, 0)))
    assert x.shape == (3, 64, 64)
    assert torch.allclose(x[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))  # (v - 0.5) / 0.5
    encoder.save(tmp_path / "w")
    card = read_card(tmp_path / "w")
    assert card["mean"] == card["std"] == [0.5, 0.5, 0.5]
    assert (card["image_size"], card["max_text_len"], card["embed_dim"]) == (64, 40, 80)
    assert card["arch"] == DEMO_ARCH and card["arch_config"] == arch_config(DEMO_ARCH).to_dict()


@pytest.mark.parametrize("arch", sorted(PUBLISHED))
def test_official_archs_have_the_published_parameter_counts(arch):
    """Counted: the Multiway backbone and its embeddings -- ``transformer.*``,
    ``text_embeddings.*``, ``token_type_embeddings`` and ``relative_position_bias_table`` -- but
    not the pretraining heads (pooler, ITC projections, ITM, MLM head, logit scales), which the
    published figures leave out."""
    with torch.device("meta"):
        model = VlmoModel(arch_config(arch))
    heads = ("pooler.", "itc_", "itm_score.", "mlm_score.", "logit_")
    counted = sum(p.numel() for k, p in model.named_parameters() if not k.startswith(heads))
    assert round(counted / 1e6) == PUBLISHED[arch]


def test_official_key_names():
    with torch.device("meta"):
        base = VlmoModel(arch_config("vlmo_base_patch16_224")).state_dict()
        plus = VlmoModel(arch_config("vlmo_base_plus_patch16_224")).state_dict()
        large = VlmoModel(arch_config("vlmo_large_patch16_224")).state_dict()
    for key in [
        "transformer.cls_token",
        "transformer.patch_embed.proj.bias",
        "transformer.blocks.0.attn.q_bias",
        "transformer.blocks.0.attn.v_bias",
        "transformer.blocks.0.attn.qkv.weight",
        "transformer.blocks.0.norm2_imag.weight",
        "transformer.blocks.0.mlp_text.fc1.weight",
        "transformer.blocks.10.mlp_vl.fc1.weight",  # VL-FFN from layer 10 (0-based): 2 of 12
        "transformer.blocks.11.norm2_vl.bias",
        "transformer.blocks.3.gamma_2",
        "transformer.norm.weight",
        "text_embeddings.word_embeddings.weight",
        "text_embeddings.position_embeddings.weight",
        "text_embeddings.LayerNorm.weight",
        "text_embeddings.position_ids",
        "token_type_embeddings.weight",
        "pooler.dense.weight",
        "itc_text_proj.fc.weight",
        "itc_vl_image_proj.fc.weight",
        "itm_score.fc.bias",
        "mlm_score.transform.LayerNorm.bias",
        "mlm_score.decoder.weight",
        "mlm_score.bias",
        "logit_scale",
        "logit_vl_scale",
    ]:
        assert key in base, key
    assert base["relative_position_bias_table"].shape == (1126, 12 * 12)
    assert "transformer.blocks.9.mlp_vl.fc1.weight" not in base
    assert not [k for k in base if k.endswith("qkv.bias") or k.startswith("transformer.pos_")]
    assert "relative_position_bias_table" not in plus and not [k for k in plus if "gamma" in k]
    assert plus["transformer.pos_embed"].shape == (1, 197, 544)
    assert "transformer.blocks.21.mlp_vl.fc2.weight" in plus
    assert "transformer.blocks.20.mlp_vl.fc2.weight" not in plus
    assert large["relative_position_bias_table"].shape == (1126, 16 * 24)


def test_relative_position_index_geometry():
    index = relative_position_indices(arch_config("vlmo_base_patch16_224"))
    image, text = index["relative_position_index"], index["text_relative_position_index"]
    both = index["text_imag_relative_position_index"]
    assert image.shape == (197, 197) and text.shape == (40, 40) and both.shape == (237, 237)
    assert int(both.max()) == 1125 and int(both.min()) == 0
    # patches (r, c) = (0, 0)->(1, 2) and (3, 3)->(4, 5) share an offset, hence a bias entry
    assert image[1, 1 + 14 + 2] == image[1 + 3 * 14 + 3, 1 + 4 * 14 + 5] != image[1, 2]
    assert text[1, 3] == text[5, 7] != text[3, 1]  # 1-D text offsets
    # 27 x 27 patch offsets, then [CLS] slots 729-731, text->image 732, image->text 733
    assert (image[0, 1:] == 729).all() and (image[1:, 0] == 730).all() and image[0, 0] == 731
    assert (both[:40, 40:] == 732).all() and (both[40:, :40] == 733).all()
    assert int(image[1:, 1:].max()) == 728 and text[1, 1] == 734 + 194  # offset 0 of 196 - 2
    assert text[0, 0] == 1125 and (text[1:, 0] == 1124).all()  # text [CLS] slots at the end


def test_text_positions_follow_the_variant(rel_arch):
    """Absolute text positions only where there is no relative bias, as the official code."""
    for arch, uses_positions in [(DEMO_ARCH, True), (rel_arch, False)]:
        torch.manual_seed(0)
        encoder = VlmoEncoder.from_arch(arch).eval()
        tokens = encoder.tokenize(TEXTS[:2])
        with torch.inference_mode():
            before = encoder.encode_texts(tokens)
            encoder.model.text_embeddings.position_embeddings.weight.mul_(3.0)
            after = encoder.encode_texts(tokens)
        assert torch.equal(before, after) != uses_positions, arch


@pytest.mark.parametrize("arch", [DEMO_ARCH, REL_ARCH])
def test_pin_official_checkpoint_from_a_local_path(arch, rel_arch, tmp_path):
    original, state = _official_state(arch)
    _lightning_checkpoint(tmp_path / "vlmo.pt", state)
    card = VlmoEncoder.pin(arch, str(tmp_path / "vlmo.pt"), tmp_path / "w")
    assert card["encoder"] == "vlmo" and card["arch"] == arch
    assert card["pretrained"] == str(tmp_path / "vlmo.pt") and "official VLMo" in card["source"]
    written = load_file(str(tmp_path / "w" / STATE_FILE))
    assert set(written) == set(state)  # every tensor of the file is used, none is missing
    assert all(torch.equal(written[k], state[k]) for k in state)
    loaded = load_encoder(tmp_path / "w")
    assert isinstance(loaded, VlmoEncoder) and loaded.weights_sha256 == card["sha256"]
    _assert_same_outputs(original, loaded)


def test_pin_downloads_over_http_and_accepts_bare_state_dicts(tmp_path):
    original, state = _official_state(DEMO_ARCH, seed=1)
    torch.save(state, tmp_path / "bare.pt")
    torch.save({"model": state}, tmp_path / "model.pt")
    server = _Server({f"/ckpt/{n}": (tmp_path / n).read_bytes() for n in ("bare.pt", "model.pt")})
    try:
        for name in ("bare.pt", "model.pt"):
            out = tmp_path / f"w-{name}"
            card = VlmoEncoder.pin(DEMO_ARCH, f"{server.base}/ckpt/{name}?sig=SECRET", out)
            assert card["pretrained"] == f"{server.base}/ckpt/{name}"  # the token is not kept
            assert "SECRET" not in (out / "weights.json").read_text()
            assert not out.with_name(out.name + ".download").exists()  # download removed
            _assert_same_outputs(original, VlmoEncoder.load(out))
        with pytest.raises(WeightsError, match=r"could not download .*missing\.pt: dead"):
            VlmoEncoder.pin(DEMO_ARCH, f"{server.base}/ckpt/missing.pt", tmp_path / "x")
    finally:
        server.close()


def test_pin_rejects_checkpoints_that_do_not_fit(rel_arch, tmp_path):
    _, state = _official_state(DEMO_ARCH)
    _lightning_checkpoint(tmp_path / "tiny.pt", state)
    with pytest.raises(WeightsError, match=r"missing keys \['relative_position_bias_table'"):
        VlmoEncoder.pin(rel_arch, str(tmp_path / "tiny.pt"), tmp_path / "w")
    extra = {**state, "vqa_classifier.0.weight": torch.zeros(2, 2)}
    extra.pop("logit_vl_scale")
    torch.save({"state_dict": extra}, tmp_path / "extra.pt")
    with pytest.raises(WeightsError, match=r"1 missing keys \['logit_vl_scale'\], 1 unexpected"):
        VlmoEncoder.pin(DEMO_ARCH, str(tmp_path / "extra.pt"), tmp_path / "w")
    wrong = {**state, "transformer.cls_token": torch.zeros(1, 1, 7)}
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(WeightsError, match=r"transformer.cls_token \(1, 1, 7\) \(arch: \(1, 1, 80"):
        VlmoEncoder.pin(DEMO_ARCH, str(tmp_path / "wrong.pt"), tmp_path / "w")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="not a readable torch checkpoint"):
        VlmoEncoder.pin(DEMO_ARCH, str(tmp_path / "junk.pt"), tmp_path / "w")
    for bad in ("s3://bucket/vlmo.pt", str(tmp_path / "nowhere.pt")):
        with pytest.raises(ValueError, match="neither an http\\(s\\) URL nor an existing local"):
            VlmoEncoder.pin(DEMO_ARCH, bad, tmp_path / "w")
    with pytest.raises(ValueError, match="unknown VLMo arch 'nope'"):
        VlmoEncoder.pin("nope", str(tmp_path / "tiny.pt"), tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_pair_losses_train_every_part_and_are_seeded():
    torch.manual_seed(0)
    encoder = VlmoEncoder.tiny().train()
    images, tokens = _images(encoder, 8), encoder.tokenize([f"a {c} shirt" for c in "abcdefgh"])
    losses = encoder.pair_losses(images, tokens)
    assert set(losses) == {"itc", "itm", "mlm"}
    m = encoder.model
    reach = {  # a head only that loss uses, and the shared trunk
        "itc": m.itc_image_proj.fc.weight,
        "itm": m.itm_score.fc.weight,
        "mlm": m.mlm_score.decoder.weight,
    }
    for name, loss in losses.items():
        assert loss.ndim == 0 and torch.isfinite(loss), name
        trunk = m.transformer.blocks[0].attn.qkv.weight
        grads = torch.autograd.grad(loss, [reach[name], trunk], retain_graph=True)
        assert all(g.abs().sum() > 0 for g in grads), name
    torch.manual_seed(1)
    again = {k: v.item() for k, v in encoder.pair_losses(images, tokens).items()}
    torch.manual_seed(1)
    assert {k: v.item() for k, v in encoder.pair_losses(images, tokens).items()} == again
    with pytest.raises(ValueError, match="B >= 2"):
        encoder.pair_losses(images[:1], encoder.tokenize(["one"]))


def test_a_few_steps_reduce_the_total_loss():
    torch.manual_seed(0)
    encoder = VlmoEncoder.tiny().train()
    colours = ["red", "green", "blue", "yellow", "black", "white"]
    images, tokens = _images(encoder, 6), encoder.tokenize([f"a {c} square" for c in colours])
    opt = torch.optim.AdamW(encoder.parameters(), lr=3e-4)
    totals = []
    for _ in range(10):
        torch.manual_seed(0)  # the same masks and negatives at every step
        loss = sum(encoder.pair_losses(images, tokens).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        totals.append(loss.item())
    assert totals[-1] < 0.92 * totals[0] and totals[-1] == min(totals), totals


def test_mlm_masking_follows_bert():
    torch.manual_seed(0)
    encoder = VlmoEncoder.tiny()
    tokens = encoder.tokenize(["unbelievably comfortable waterproof hiking boots"] * 400)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    masked, labels = encoder._mask_for_mlm(ids, mask)
    chosen = labels != -100
    special = (ids == 0) | (ids == 101) | (ids == 102)
    assert not chosen[special].any() and torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])
    assert 0.10 < chosen.sum() / (~special).sum() < 0.20
    share = chosen.sum().item()
    assert 0.75 < (masked[chosen] == 103).sum() / share < 0.85  # [MASK]
    assert 0.05 < (masked[chosen] == ids[chosen]).sum() / share < 0.15  # kept
    pieces = encoder._continuation[ids]  # "##" pieces follow their word's first piece
    starts = torch.roll(chosen, 1, dims=1)
    assert torch.equal(chosen[pieces], starts[pieces])


def test_hard_negatives_never_pick_the_match():
    torch.manual_seed(0)
    logits = torch.randn(6, 6) * 3
    picks = torch.stack([_sample_negatives(logits) for _ in range(200)])
    assert not (picks == torch.arange(6)).any()
    assert len(set(picks[:, 0].tolist())) > 1  # sampled, not the argmax
    certain = torch.eye(4) * 1e4  # off-diagonal softmax underflows to zero: uniform instead
    assert not (_sample_negatives(certain) == torch.arange(4)).any()


def test_logit_scale_is_clamped_in_the_forward():
    torch.manual_seed(0)
    encoder = VlmoEncoder.tiny()
    with torch.no_grad():
        encoder.model.logit_scale.fill_(10.0)
    feats = torch.eye(3)
    logits = encoder._itc_logits(feats, feats, encoder.model.logit_scale)
    assert math.isclose(logits[0, 0].item(), 100.0, rel_tol=1e-5)
