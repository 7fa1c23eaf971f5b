"""The cnn_st baseline: published .b image features, the CNN + MiniLM encoder, CNN pretraining."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from safetensors import safe_open
from test_preprocess import CORE_ITEMS, INFO, _images, _meta, _reviews, _write_raw

from pipeline.data.cnn_features import (
    FEATURE_DIM,
    IMAGE_FEATURES_FILE,
    align_to_items,
    published_image_features,
    read_image_features,
)
from pipeline.data.demo.attributes import ATTRIBUTES, IMAGE_ATTRIBUTES
from pipeline.data.demo.corpus import CorpusConfig, pretraining_corpus
from pipeline.data.preprocess import PreprocessConfig, preprocess
from pipeline.encoders import get_encoder, load_encoder
from pipeline.encoders.base import STATE_FILE, WeightsError, read_card
from pipeline.encoders.cnn_pretrain import CnnPretrainConfig, augment, pretrain_cnn
from pipeline.encoders.cnn_st import (
    DEMO_ARCH,
    CnnStEncoder,
    split_arch,
    strip_classifier,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _record(asin: str, vector: np.ndarray) -> bytes:
    """One .b record, written independently of the reader: 10 ASCII bytes, 4096 LE float32."""
    return asin.encode("ascii").ljust(10) + struct.pack(f"<{FEATURE_DIM}f", *vector.tolist())


def _vectors(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, FEATURE_DIM)).astype(np.float32)


# -- the .b format ------------------------------------------------------------------------------


def test_b_file_round_trip_with_truncated_tail_and_duplicates(tmp_path, caplog):
    asins = ["B000000001", "B000000002", "0123456789", "B00XYZ1234", "B000000005"]
    vectors = _vectors(5)
    data = b"".join(_record(a, v) for a, v in zip(asins, vectors, strict=True))
    path = tmp_path / "image_features_Tiny.b"
    path.write_bytes(data)
    got_asins, got, stats = read_image_features(path, chunk_records=2)
    assert got_asins == asins and got.dtype == np.float32 and np.array_equal(got, vectors)
    assert (stats.records, stats.kept, stats.duplicates, stats.truncated_records) == (5, 5, 0, 0)

    extra = _record("B000000002", _vectors(1, seed=1)[0])  # a repeat: the first one wins
    path.write_bytes(data + extra + _record("B0TRUNCATE", vectors[0])[:1000])
    with caplog.at_level(logging.WARNING):
        got_asins, got, stats = read_image_features(path, chunk_records=4)
    assert got_asins == asins and np.array_equal(got, vectors)
    assert (stats.records, stats.duplicates, stats.truncated_bytes) == (6, 1, 1000)
    assert stats.truncated_records == 1
    assert "truncated (1000 of 16394 bytes)" in caplog.text

    got_asins, got, stats = read_image_features(path, keep={"B00XYZ1234", "B000000001", "NOPE"})
    assert got_asins == ["B000000001", "B00XYZ1234"] and stats.kept == 2
    assert np.array_equal(got, vectors[[0, 3]])
    with pytest.raises(FileNotFoundError, match="absent.b"):
        read_image_features(tmp_path / "absent.b")


def test_align_fills_missing_items_with_the_mean_of_found_ones():
    vectors = _vectors(3)
    matrix, found = align_to_items(["c", "x", "a", "y"], ["a", "b", "c"], vectors)
    assert found.tolist() == [True, False, True, False]
    assert np.array_equal(matrix[0], vectors[2]) and np.array_equal(matrix[2], vectors[0])
    mean = (vectors[0].astype(np.float64) + vectors[2]) / 2  # of the found items, not all vectors
    np.testing.assert_allclose(matrix[1], mean, rtol=1e-6)
    assert np.array_equal(matrix[1], matrix[3]) and matrix.dtype == np.float32
    with pytest.raises(ValueError, match="none of the 2 items"):
        align_to_items(["x", "y"], ["a"], vectors[:1])


def test_preprocess_keeps_the_published_vectors_of_its_items(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    _write_raw(raw, _reviews(), _meta(), _images())
    vectors = _vectors(12)
    asins = CORE_ITEMS[:5] + ["ZNOTANITEM"] + CORE_ITEMS[10:15] + ["X"]  # X: a cascade item
    blob = b"".join(_record(a, v) for a, v in zip(asins, vectors, strict=True))
    blob += _record("I00", _vectors(1, seed=3)[0]) + b"\x01" * 77  # a repeat, a truncated tail
    (raw / INFO.image_features_file).write_bytes(blob)
    stats = preprocess(raw, INFO, out, PreprocessConfig(workers=2))

    assert stats["image_features_file"] is True
    assert stats["image_features_records"] == 13 and stats["image_features_duplicates"] == 1
    assert stats["image_features_truncated_bytes"] == 77 and stats["image_features_found"] == 10
    assert json.loads((out / "stats.json").read_text()) == stats
    table = pq.read_table(out / IMAGE_FEATURES_FILE)
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert meta["found"] == "10" and meta["items"] == "20" and meta["source_exists"] == "true"
    image_type = table.schema.field("image").type
    assert (image_type.list_size, image_type.value_type) == (4096, pa.float32())
    ids = table["item_id"].to_pylist()
    assert ids == [*range(5), *range(10, 15)]  # item ids are the sorted asins' positions
    stored = np.array(table["image"].to_pylist(), np.float32)
    assert np.array_equal(stored, vectors[[*range(5), *range(6, 11)]])

    matrix, found = published_image_features(out / IMAGE_FEATURES_FILE, np.arange(20))
    assert found.tolist() == [i in ids for i in range(20)]
    assert np.array_equal(matrix[found], stored)
    np.testing.assert_allclose(matrix[7], stored.mean(axis=0, dtype=np.float64), rtol=1e-5)
    matrix, found = published_image_features(out / IMAGE_FEATURES_FILE, [12, 3])
    assert found.all() and np.array_equal(matrix, stored[[7, 3]])


# -- the encoder --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> CnnStEncoder:
    torch.manual_seed(0)
    return CnnStEncoder.tiny().eval()


TEXTS = ["a red mug", "", "a much longer text about a blue cotton shirt with stripes"]


def test_tiny_encoder_shapes_and_card(tiny):
    assert get_encoder("cnn_st") is CnnStEncoder and tiny.name == "cnn_st"
    assert tiny.arch == "lmmrec-cnn-tiny+all-MiniLM-L6-v2"
    assert (tiny.image_dim, tiny.text_dim, tiny.image_size) == (128, 384, 64)
    assert 100_000 < sum(p.numel() for p in tiny.cnn.parameters()) < 1_000_000
    image = tiny.image_transform(Image.new("L", (90, 70), 128))
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    tokens = tiny.tokenize(TEXTS)
    assert set(tokens) >= {"input_ids", "attention_mask"}
    assert all(isinstance(v, torch.Tensor) and v.shape[0] == 3 for v in tokens.values())
    with torch.inference_mode():
        assert tiny.encode_images(torch.randn(5, 3, 64, 64)).shape == (5, 128)
        text = tiny.encode_texts(tokens)
    assert text.shape == (3, 384)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(3))  # the ST normalises
    with pytest.raises(TypeError, match="dict of tensors"):
        tiny.encode_texts(tokens["input_ids"])


def test_torchvision_arch_is_cut_at_its_penultimate_layer():
    torch.manual_seed(0)
    encoder = CnnStEncoder.from_arch("mobilenet_v3_small").eval()
    assert encoder.arch == "mobilenet_v3_small+all-MiniLM-L6-v2" and encoder.image_dim == 1024
    assert (encoder.image_size, encoder.prep.resize_size) == (224, 256)
    reference = torchvision.models.get_model("mobilenet_v3_small")
    reference.load_state_dict(encoder.cnn.state_dict(), strict=False)
    reference.classifier[3] = torch.nn.Identity()  # Linear(1024, 1000): the classifier
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        torch.testing.assert_close(encoder.encode_images(x), reference.eval()(x))


def test_bad_archs_are_named():
    assert split_arch("resnet50") == ("resnet50", "all-MiniLM-L6-v2")
    assert split_arch(f"{DEMO_ARCH}+all-MiniLM-L6-v2") == (DEMO_ARCH, "all-MiniLM-L6-v2")
    with pytest.raises(ValueError, match=r"unknown cnn_st image arch 'resnet9'.*'resnet50'"):
        split_arch("resnet9")
    with pytest.raises(ValueError, match=r"unknown cnn_st text model 'bert'.*all-MiniLM-L6-v2"):
        split_arch("resnet50+bert")
    with pytest.raises(ValueError, match="'squeezenet1_1' has no linear classifier"):
        strip_classifier(torchvision.models.get_model("squeezenet1_1"), "squeezenet1_1")


def test_weights_folder_holds_both_towers_and_round_trips(tiny, tmp_path):
    tiny.save(tmp_path / "w")
    card = read_card(tmp_path / "w")
    assert card["arch"] == tiny.arch and card["pretrained"] == "none"
    assert card["image_size"] == 64 and card["text_dim"] == 384 and card["text_normalized"]
    with safe_open(str(tmp_path / "w" / STATE_FILE), "pt") as f:
        prefixes = {key.split(".")[0] for key in f.keys()}  # noqa: SIM118
    assert prefixes == {"cnn", "text"}

    loaded = load_encoder(tmp_path / "w")
    assert isinstance(loaded, CnnStEncoder) and loaded.weights_sha256 == card["sha256"]
    assert not loaded.training and loaded.source == tiny.source
    images = torch.stack(
        [tiny.image_transform(Image.new("RGB", (64, 64), c)) for c in ("red", "lime", "blue")]
    )
    tokens = tiny.tokenize(TEXTS)
    with torch.inference_mode():
        assert torch.equal(loaded.encode_images(images), tiny.encode_images(images))
        assert torch.equal(loaded.encode_texts(tokens), tiny.encode_texts(tokens))


def test_minilm_puts_paraphrases_closer_than_unrelated_texts(tiny):
    texts = [
        "A man is playing a guitar.",
        "Someone is strumming a guitar.",
        "The stock market fell sharply today.",
        "a stainless steel water bottle",
        "metal flask for drinking water",
        "a wool winter hat",
    ]
    with torch.inference_mode():
        emb = F.normalize(tiny.encode_texts(tiny.tokenize(texts)), dim=-1)
    sims = emb @ emb.T
    assert sims[0, 1] > sims[0, 2] + 0.3 and sims[0, 1] > 0.6
    assert sims[3, 4] > sims[3, 5] + 0.2 and sims[3, 4] > sims[3, 2]


def test_text_tower_loads_from_the_package_without_network(monkeypatch):
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)

    def refuse(self, address):
        raise AssertionError(f"network access to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    encoder = CnnStEncoder.tiny().eval()
    with torch.inference_mode():
        assert encoder.encode_texts(encoder.tokenize(["offline"])).shape == (1, 384)


# -- demo pretraining ---------------------------------------------------------------------------


def test_augment_crops_and_flips_per_image():
    x = torch.rand(16, 3, 8, 8)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(augment(x, 0, False, gen), x)
    out = augment(x, 0, True, gen)
    kept = [torch.equal(o, i) for o, i in zip(out, x, strict=True)]
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x, strict=True)]
    assert all(k != f for k, f in zip(kept, flipped, strict=True)) and 0 < sum(flipped) < 16
    shifted = augment(x, 2, False, gen)  # each image moved by up to 2 pixels each way
    assert shifted.shape == x.shape and not torch.equal(shifted, x)
    for out, image in zip(shifted, x, strict=True):
        shifts = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(out[:, 2:6, 2:6], image[:, dy : dy + 4, dx : dx + 4])
        ]
        assert len(shifts) == 1


def test_pretraining_beats_chance_and_is_seeded():
    corpus = pretraining_corpus(CorpusConfig(n_pairs=448, image_size=64))
    cfg = CnnPretrainConfig(epochs=4, batch_size=64, lr=4e-3, holdout_pairs=128)
    encoder, history = pretrain_cnn(DEMO_ARCH, corpus, cfg)
    assert isinstance(encoder, CnnStEncoder) and encoder.pretrained == "demo"
    assert not encoder.training and "320 images, 4 epochs" in encoder.source
    assert len(history["loss"]) == 4 and history["loss"][-1] < history["loss"][0]
    chance = {a: 1 / len(ATTRIBUTES[a].values) for a in IMAGE_ATTRIBUTES}
    assert history["valid_acc_colour"][-1] > 4 * chance["colour"], history
    assert history["valid_acc"][-1] > 1.5 * np.mean(list(chance.values())), history

    again, history_again = pretrain_cnn(DEMO_ARCH, corpus, cfg)
    assert history_again["loss"] == history["loss"]
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            encoder.cnn.state_dict().values(), again.cnn.state_dict().values(), strict=True
        )
    )


def test_pretraining_config_is_checked():
    with pytest.raises(ValueError, match="epochs >= 1"):
        CnnPretrainConfig(epochs=0)
    with pytest.raises(ValueError, match="warmup_fraction"):
        CnnPretrainConfig(warmup_fraction=1.0)
    corpus = pretraining_corpus(CorpusConfig(n_pairs=4, image_size=16))
    with pytest.raises(ValueError, match="holdout_pairs=3 leaves < 2 of 4"):
        pretrain_cnn(DEMO_ARCH, corpus, CnnPretrainConfig(holdout_pairs=3))


# -- pinning torchvision's published weights ----------------------------------------------------


@pytest.fixture()
def served(monkeypatch):
    """A local HTTP server for ``files`` (path -> bytes); proxies from the environment unset."""
    for key in [k for k in os.environ if k.lower().endswith("_proxy")]:
        monkeypatch.delenv(key)
    files: dict[str, bytes] = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            body = files.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield files, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_pin_fetches_checks_and_records_torchvision_weights(served, tmp_path):
    files, base = served
    torch.manual_seed(1)
    published = torchvision.models.get_model("shufflenet_v2_x0_5").eval()
    buf = io.BytesIO()
    torch.save(published.state_dict(), buf)
    digest = hashlib.sha256(buf.getvalue()).hexdigest()
    files[f"/models/shufflenetv2_x0.5-{digest[:10]}.pth"] = buf.getvalue()
    files["/models/shufflenetv2_x0.5-0123456789.pth"] = buf.getvalue()  # a wrong hash
    url = f"{base}/models/shufflenetv2_x0.5-{digest[:10]}.pth"

    card = CnnStEncoder.pin("shufflenet_v2_x0_5", "IMAGENET1K_V1", tmp_path / "w", url=url)
    assert card["pretrained"] == "IMAGENET1K_V1" and card["url"] == url
    assert url in card["source"] and digest in card["source"]
    assert card["arch"] == "shufflenet_v2_x0_5+all-MiniLM-L6-v2" and card["image_dim"] == 1024
    assert (card["image_size"], card["resize_size"]) == (224, 256)
    assert card["cnn_kwargs"] == {"num_classes": 1000}
    encoder = load_encoder(tmp_path / "w")
    published.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(encoder.encode_images(x), published(x))

    with pytest.raises(WeightsError, match=re.escape("file name's 0123456789")):
        CnnStEncoder.pin(
            "shufflenet_v2_x0_5",
            "IMAGENET1K_V1",
            tmp_path / "bad",
            url=f"{base}/models/shufflenetv2_x0.5-0123456789.pth",
        )
    with pytest.raises(WeightsError, match="dead"):
        CnnStEncoder.pin("resnet18", "IMAGENET1K_V1", tmp_path / "bad", url=f"{base}/gone.pth")
    assert not (tmp_path / "bad").exists()


def test_pin_rejects_unknown_tags_and_the_demo_arch_before_any_download(tmp_path):
    with pytest.raises(ValueError, match=r"unknown pretrained tag 'nope'.*IMAGENET1K_V2"):
        CnnStEncoder.pin("resnet50", "nope", tmp_path / "w")
    with pytest.raises(ValueError, match="no published weights"):
        CnnStEncoder.pin(DEMO_ARCH, "IMAGENET1K_V1", tmp_path / "w")
    assert not (tmp_path / "w").exists()
