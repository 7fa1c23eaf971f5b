"""Encoder registry, the CLIP family, its weights folder and the demo pretraining."""

import json
from dataclasses import replace
from itertools import combinations, pairwise

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from pipeline.encoders import (
    Encoder,
    get_encoder,
    list_encoders,
    load_encoder,
    register_encoder,
)
from pipeline.encoders._multiway import VlmoModel
from pipeline.encoders.base import STATE_FILE, WEIGHTS_CARD, WeightsError, read_card
from pipeline.encoders.clip import (
    DEMO_ARCH,
    ClipEncoder,
    length_groups,
    pin_open_clip_weights,
)
from pipeline.encoders.pairtrain import (
    PairTrainConfig,
    augment,
    embed_pairs,
    retrieval_recall,
    train_pairs,
)
from pipeline.encoders.vlmo import DEMO_ARCH as VLMO_DEMO
from pipeline.encoders.vlmo import VlmoEncoder
from pipeline.encoders.vlmo import arch_config as vlmo_arch

MICRO_ARCH = "lmmrec-test-micro"  # a CLIP small enough to train in a test
MICRO_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 40),
    "purple": (130, 40, 170),
    "orange": (245, 140, 20),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
}


@pytest.fixture(scope="module")
def micro_arch(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("configs") / f"{MICRO_ARCH}.json"
    path.write_text(json.dumps(MICRO_CFG))
    open_clip.add_model_config(path)
    return MICRO_ARCH


def coloured_squares(n: int, seed: int = 0) -> tuple[list[Image.Image], list[str], list[str]]:
    """n 32x32 images: a square of a named colour on a light background, at a random place."""
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    images, captions, labels = [], [], []
    for i in range(n):
        name = names[i % len(names)]
        img = np.full((32, 32, 3), 200, np.uint8) + rng.integers(0, 30, 3).astype(np.uint8)
        x, y, s = rng.integers(0, 12), rng.integers(0, 12), rng.integers(14, 20)
        shade = np.clip(np.array(COLOURS[name]) + rng.normal(0, 10, 3), 0, 255)
        img[y : y + s, x : x + s] = shade.astype(np.uint8)
        images.append(Image.fromarray(img))
        captions.append(f"a {name} square")
        labels.append(name)
    return images, captions, labels


def test_registry_finds_clip_and_names_known_encoders():
    assert "clip" in list_encoders()
    assert get_encoder("clip") is ClipEncoder
    assert ClipEncoder.name == "clip"
    with pytest.raises(ValueError, match=r"unknown encoder 'nope'.*'clip'"):
        get_encoder("nope")


@pytest.mark.parametrize("name", list_encoders())
def test_every_registered_encoder_encodes_saves_and_loads(name, tmp_path):
    torch.manual_seed(0)
    encoder = get_encoder(name).tiny().eval()
    assert isinstance(encoder, Encoder) and encoder.name == name
    images = torch.stack(
        [encoder.image_transform(Image.new("RGB", (50, 40), c)) for c in ("red", "green", "blue")]
    )
    tokens = encoder.tokenize(["a red mug", "", "a much longer text about a blue cotton shirt"])
    with torch.inference_mode():
        image, text = encoder.encode_images(images), encoder.encode_texts(tokens)
    assert image.shape == (3, encoder.image_dim) and text.shape == (3, encoder.text_dim)
    assert encoder.trainable_parameters()

    encoder.save(tmp_path / "w")
    card = read_card(tmp_path / "w")
    assert card["encoder"] == name and card["sha256"] == encoder.weights_sha256
    loaded = load_encoder(tmp_path / "w")
    assert type(loaded) is type(encoder) and loaded.weights_sha256 == card["sha256"]
    with torch.inference_mode():
        torch.testing.assert_close(loaded.encode_images(images), image)
        torch.testing.assert_close(loaded.encode_texts(tokens), text)


@pytest.mark.parametrize("name", ["clip", "vlmo"])
def test_towers_split_after_any_block_into_the_whole_pass(name):
    torch.manual_seed(0)
    encoder = get_encoder(name).tiny().eval()
    images = torch.randn(2, 3, encoder.image_size, encoder.image_size)
    tokens = encoder.tokenize(["a red mug", "a much longer text about a blue cotton shirt"])
    with torch.no_grad():
        image, text = encoder.encode_images(images), encoder.encode_texts(tokens)
        for k in range(encoder.n_blocks() + 1):
            split = encoder.image_suffix(encoder.image_prefix(images, k), k)
            torch.testing.assert_close(split, image, atol=1e-6, rtol=0, msg=f"image, k={k}")
            split = encoder.text_suffix(encoder.text_prefix(tokens, k), k)  # blocks < k at full
            # length, the rest cut after the last pooled token: sums in another order
            torch.testing.assert_close(split, text, atol=1e-5, rtol=0, msg=f"text, k={k}")
    top = encoder.n_blocks() - 1
    below, whole = encoder.prefix_sha256(1), encoder.prefix_sha256(top + 1)
    upper = next(p for n, p in encoder.named_parameters() if f".{top}." in n)
    with torch.no_grad():
        upper.add_(1.0)  # in the top block: the prefix up to block 1 is the same function
    assert encoder.prefix_sha256(1) == below and encoder.prefix_sha256(top + 1) != whole


def _whole_passes(encoder: Encoder, images: torch.Tensor, tokens) -> tuple:
    """Image and text embeddings with every block computing every token: open_clip's own
    forward for CLIP, the unimodal passes' [CLS] for VLMo."""
    if isinstance(encoder, ClipEncoder):
        return encoder.model.encode_image(images), encoder.model.encode_text(tokens)
    m = encoder.model
    image = m.unimodal(m.embed_image(images), None, "image")[0][:, 0]
    text = m.unimodal(m.embed_text(tokens["input_ids"]), tokens["attention_mask"], "text")[0]
    return m.itc_image_proj(image), m.itc_text_proj(text[:, 0])


def _vlmo_base_like(drop_path_rate: float = 0.0) -> VlmoEncoder:
    """The demo VLMo with base/large's relative position bias table and layer scale."""
    arch = replace(vlmo_arch(VLMO_DEMO), relative_position_bias=True, abs_pos_emb=False,
                   layer_scale_init=0.1, drop_path_rate=drop_path_rate)  # fmt: skip
    return VlmoEncoder(VlmoModel(arch), "vlmo-test-rel")


@pytest.mark.parametrize(
    "build", [ClipEncoder.tiny, VlmoEncoder.tiny, _vlmo_base_like], ids=["clip", "vlmo", "vlmo-rel"]
)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_the_last_block_computes_the_pooled_token_alone_with_the_whole_passs_result(build, train):
    torch.manual_seed(0)
    encoder = build().train(train)
    for p in encoder.parameters():  # no zero-initialised bias or layer scale hides a term
        with torch.no_grad():
            p.add_(torch.randn_like(p) * 0.02)
    images = torch.randn(3, 3, encoder.image_size, encoder.image_size)
    tokens = encoder.tokenize(["a red mug", "", "a much longer text about a blue cotton shirt"])
    k = encoder.n_blocks() - 1
    encoder.freeze_lower_layers(k)
    weights = torch.randn(2, 3, encoder.image_dim)
    results = []
    for split in (False, True):
        if split:
            image = encoder.image_suffix(encoder.image_prefix(images, k), k)
            text = encoder.text_suffix(encoder.text_prefix(tokens, k), k)
        else:
            image, text = _whole_passes(encoder, images, tokens)
        encoder.zero_grad(set_to_none=True)
        ((image * weights[0]).sum() + (text * weights[1]).sum()).backward()
        grads = {n: p.grad for n, p in encoder.named_parameters() if p.requires_grad}
        results.append((image.detach(), text.detach(), grads))
    (image, text, grads), (split_image, split_text, split_grads) = results
    torch.testing.assert_close(split_image, image, atol=1e-5, rtol=0)
    torch.testing.assert_close(split_text, text, atol=1e-5, rtol=0)
    top = [n for n, g in grads.items() if f".{k}." in n and g is not None]
    assert top and grads.keys() == split_grads.keys()  # the top block trains
    for name, grad in grads.items():
        if grad is None:
            assert split_grads[name] is None, name
        else:
            torch.testing.assert_close(split_grads[name], grad, atol=1e-5, rtol=0, msg=name)


def test_vlmo_stochastic_depth_drops_the_pooled_token_as_the_whole_pass_does():
    encoder = _vlmo_base_like(drop_path_rate=0.5).train()
    images = torch.randn(8, 3, encoder.image_size, encoder.image_size)
    tokens = encoder.tokenize(["a red mug", "blue"] * 4)
    outputs = []
    for split in (False, True):
        torch.manual_seed(1)  # the same per-sample draws, in the same order
        if split:
            outputs.append((encoder.encode_images(images), encoder.encode_texts(tokens)))
        else:
            outputs.append(_whole_passes(encoder, images, tokens))
    for whole, split in zip(*outputs, strict=True):
        torch.testing.assert_close(split, whole, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("tower", "pool"), [("image", "avg"), ("text", "last"),
                                             ("text", "first"), ("text", "none")])  # fmt: skip
def test_clip_pools_as_its_config_says(tower, pool):
    torch.manual_seed(0)
    encoder = ClipEncoder.tiny().eval()
    if tower == "image":
        encoder.model.visual.pool_type = pool
    else:
        encoder.model.text_pool_type = pool
    images = torch.randn(2, 3, encoder.image_size, encoder.image_size)
    tokens = encoder.tokenize(["a red mug", "a much longer text about a blue cotton shirt"])
    with torch.no_grad():
        image, text = _whole_passes(encoder, images, tokens)
        torch.testing.assert_close(encoder.encode_images(images), image, atol=1e-5, rtol=0)
        torch.testing.assert_close(encoder.encode_texts(tokens), text, atol=1e-5, rtol=0)


def test_register_rejects_duplicates_and_non_encoders():
    with pytest.raises(ValueError, match="already registered"):

        @register_encoder("clip")
        class Other(ClipEncoder):
            pass

    with pytest.raises(TypeError, match="needs a subclass of Encoder"):
        register_encoder("thing")(dict)
    assert get_encoder("clip") is ClipEncoder


def test_demo_arch_is_an_open_clip_model():
    torch.manual_seed(0)
    model = open_clip.create_model(DEMO_ARCH)
    assert model.encode_image(torch.zeros(2, 3, 64, 64)).shape == (2, 128)
    encoder = ClipEncoder.from_arch(DEMO_ARCH)
    assert isinstance(encoder, Encoder)
    assert (encoder.image_dim, encoder.text_dim) == (128, 128)
    assert (encoder.image_size, encoder.context_length) == (64, 32)
    tokens = encoder.tokenize(["a red mug", "a blue shoe"])
    assert tokens.shape == (2, 32) and tokens.dtype == torch.long
    assert encoder.image_transform(Image.new("RGB", (80, 64))).shape == (3, 64, 64)


def test_unknown_arch_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown CLIP arch 'ViT-Q-99'.*ViT-B-16"):
        ClipEncoder.from_arch("ViT-Q-99")


def test_weights_folder_round_trip(micro_arch, tmp_path):
    torch.manual_seed(0)
    encoder = ClipEncoder.from_arch(micro_arch).eval()
    encoder.pretrained, encoder.source = "demo", "a test"
    encoder.save(tmp_path / "w")
    card = read_card(tmp_path / "w")
    assert card["encoder"] == "clip" and card["arch"] == micro_arch
    assert card["pretrained"] == "demo" and card["source"] == "a test"
    assert card["image_size"] == 32 and card["context_length"] == 16 and card["embed_dim"] == 32
    assert len(card["mean"]) == len(card["std"]) == 3
    assert card["sha256"] == encoder.weights_sha256

    loaded = load_encoder(tmp_path / "w")
    assert isinstance(loaded, ClipEncoder) and loaded.weights_sha256 == card["sha256"]
    x = torch.randn(3, 3, 32, 32)
    tokens = encoder.tokenize(["red", "a green square", "blue things"])
    with torch.inference_mode():
        assert torch.equal(encoder.encode_images(x), loaded.encode_images(x))
        assert torch.equal(encoder.encode_texts(tokens), loaded.encode_texts(tokens))
        assert torch.equal(encoder.logit_scale, loaded.logit_scale)


def test_weights_folder_is_checked(micro_arch, tmp_path):
    torch.manual_seed(0)
    ClipEncoder.from_arch(micro_arch).save(tmp_path / "w")
    card = json.loads((tmp_path / "w" / WEIGHTS_CARD).read_text())
    (tmp_path / "w" / WEIGHTS_CARD).write_text(json.dumps({**card, "encoder": "vlmo"}))
    with pytest.raises(WeightsError, match="holds 'vlmo' weights, expected 'clip'"):
        ClipEncoder.load(tmp_path / "w")
    (tmp_path / "w" / WEIGHTS_CARD).write_text(json.dumps(card))
    with open(tmp_path / "w" / STATE_FILE, "ab") as f:
        f.write(b"tampered")
    with pytest.raises(WeightsError, match="sha256"):
        ClipEncoder.load(tmp_path / "w")
    with pytest.raises(WeightsError, match="does not exist"):
        load_encoder(tmp_path / "nowhere")


def test_pin_rejects_unknown_tags_before_any_download(tmp_path):
    with pytest.raises(ValueError, match=r"unknown pretrained tag 'nope'.*openai"):
        pin_open_clip_weights("ViT-B-16", "nope", tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_retrieval_recall_counts_rank_of_true_pair():
    emb = torch.eye(4)
    assert retrieval_recall(emb, emb, ks=(1,)) == {"i2t_r1": 1.0, "t2i_r1": 1.0}
    shifted = emb[[1, 2, 3, 0]]  # image i is most similar to text i - 1
    recall = retrieval_recall(emb, shifted, ks=(1, 4))
    assert recall["i2t_r1"] == 0.0 and recall["i2t_r4"] == 1.0


def test_augment_is_identity_without_crop_or_flip():
    x = torch.randn(4, 3, 16, 16)
    cfg = PairTrainConfig(min_crop_scale=1.0, hflip=False)
    out = augment(x, cfg, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)
    flipped = augment(x, PairTrainConfig(min_crop_scale=0.5), torch.Generator().manual_seed(0))
    assert flipped.shape == x.shape and not torch.allclose(flipped, x)


def test_pair_training_rejects_bad_input(micro_arch):
    images, captions, _ = coloured_squares(8)
    encoder = ClipEncoder.from_arch(micro_arch)
    with pytest.raises(ValueError, match="8 images but 7 texts"):
        train_pairs(encoder, images, captions[:7], PairTrainConfig(holdout=0))
    with pytest.raises(ValueError, match="epochs >= 1"):
        train_pairs(encoder, images, captions, PairTrainConfig(epochs=0, holdout=0))
    with pytest.raises(ValueError, match="holdout=0.9 of 8 pairs"):
        train_pairs(encoder, images, captions, PairTrainConfig(holdout=0.9))
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        train_pairs(encoder, images, captions, PairTrainConfig(precision="fp8"))
    with pytest.raises(ValueError, match="patience=2 needs held-out pairs"):
        train_pairs(encoder, images, captions, PairTrainConfig(holdout=0, patience=2))


def _trained(micro_arch, cfg):
    images, captions, labels = coloured_squares(64)
    torch.manual_seed(0)
    encoder = ClipEncoder.from_arch(micro_arch)
    return encoder, train_pairs(encoder, images, captions, cfg), images, labels


def test_pair_training_learns_colours_and_is_seeded(micro_arch):
    cfg = PairTrainConfig(epochs=8, batch_size=16, lr=2e-3, warmup_steps=4, holdout=0.25)
    encoder, history, images, labels = _trained(micro_arch, cfg)
    assert len(history["loss"]) == 8 and history["loss"][-1] < 0.8 * history["loss"][0]
    assert history["loss_itc"] == history["loss"]  # CLIP's objective is ITC alone
    assert len(history["valid_i2t_r10"]) == 9  # before training, then after each epoch
    assert not encoder.training and encoder.device.type == "cpu"

    # image -> caption: the top caption names the square's colour far above chance (1/8)
    pixels = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images])
    names = list(COLOURS)
    img, txt = embed_pairs(encoder, pixels, encoder.tokenize([f"a {c} square" for c in names]))
    predicted = [names[i] for i in (img @ txt.T).argmax(dim=1)]
    accuracy = np.mean([p == t for p, t in zip(predicted, labels, strict=True)])
    assert accuracy >= 0.5, f"colour accuracy {accuracy:.2f}"

    _, again, _, _ = _trained(micro_arch, cfg)
    assert again["loss"] == history["loss"]


def test_gradient_accumulation_and_early_stopping(micro_arch):
    cfg = PairTrainConfig(
        epochs=6, batch_size=8, grad_accum=2, lr=2e-3, warmup_steps=2, holdout=0.25, patience=1
    )
    encoder, history, _, _ = _trained(micro_arch, cfg)
    steps = len(history["loss"])
    assert 1 <= steps <= 6 and len(history["valid_i2t_r10"]) == steps + 1
    best = history["best_epoch"][0]
    scores = history["valid_i2t_r10"]
    assert scores[best] == max(scores[: steps + 1])  # the kept epoch is the best one seen
    if steps < 6:
        assert steps - best == 1  # stopped after one epoch without gain


def test_clip_pair_loss_caps_the_temperature(micro_arch):
    torch.manual_seed(0)
    encoder = ClipEncoder.from_arch(micro_arch)
    images, captions, _ = coloured_squares(4)
    x = torch.stack([encoder.image_transform(im) for im in images])
    with torch.no_grad():
        encoder.logit_scale.fill_(10.0)  # e^10 would be far past CLIP's cap of 100
    loss = encoder.pair_losses(x, encoder.tokenize(captions))["itc"]
    loss.backward()
    assert torch.isfinite(loss) and encoder.logit_scale.grad.item() == 0.0


def test_clip_texts_of_mixed_lengths_run_in_groups_with_open_clip_s_outputs_and_gradients():
    torch.manual_seed(0)
    encoder = ClipEncoder.tiny().train()
    words = "a red cotton mug with a striped pattern and a long handle for tea and coffee".split()
    tokens = encoder.tokenize([" ".join(words[: 1 + (7 * i) % len(words)]) for i in range(96)])
    assert len(length_groups(encoder.pooled_lengths(tokens))) > 1  # the grouped path runs
    weights = torch.randn(len(tokens), encoder.model.text_projection.shape[1]) / len(tokens)
    outputs, grads = [], []
    for encode in (encoder.encode_texts, encoder.model.encode_text):
        encoder.zero_grad(set_to_none=True)
        out = encode(tokens)
        (out * weights).sum().backward()
        outputs.append(out.detach())
        grads.append({n: p.grad for n, p in encoder.named_parameters() if p.grad is not None})
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=0)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", range(20))
def test_length_groups_are_the_cheapest_split(seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 12, (int(torch.randint(1, 40, (1,), generator=gen)),), generator=gen)
    cost = int(torch.randint(0, 30, (1,), generator=gen))
    values = sorted(set(lengths.tolist()))

    def price(cuts: list[int]) -> int:
        sizes = [int(((lengths > lo) & (lengths <= hi)).sum()) for lo, hi in pairwise([0, *cuts])]
        return sum(n * hi for n, hi in zip(sizes, cuts, strict=True)) + cost * len(cuts)

    cuts = length_groups(lengths, group_cost=cost)
    assert cuts == sorted(set(cuts)) and set(cuts) <= set(values) and cuts[-1] == values[-1]
    splits = [[*c, values[-1]] for r in range(len(values)) for c in combinations(values[:-1], r)]
    assert price(cuts) == min(map(price, splits))


def test_clip_text_pass_stops_at_the_batch_s_last_pooled_token():
    torch.manual_seed(0)
    encoder = ClipEncoder.tiny().eval()
    short = encoder.tokenize(["a red mug", "blue shirt"])
    longer = encoder.tokenize(["a red mug", "a much longer text about a blue cotton shirt"])
    context = short.shape[1]
    assert encoder.causal_length(short) == int(short.argmax(dim=1).max()) + 1 < context
    assert encoder.causal_length(short) < encoder.causal_length(longer) < context
    with torch.no_grad():
        torch.testing.assert_close(
            encoder.encode_texts(short), encoder.model.encode_text(short), atol=1e-5, rtol=0
        )
        encoder.model.attn_mask = None  # bidirectional: padding is attended to, nothing is cut
        assert encoder.causal_length(short) == context
