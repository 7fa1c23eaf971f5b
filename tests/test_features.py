"""Feature extraction and the Parquet + FAISS feature store."""

import json

import faiss
import numpy as np
import open_clip
import polars as pl
import pytest
import torch
from tables import make_items

from pipeline.data.schemas import ContractError
from pipeline.encoders.clip import ClipEncoder
from pipeline.features.extract import ExtractConfig, extract_features, feature_metadata
from pipeline.features.store import nearest_items, read_feature_store, write_feature_store

MICRO_ARCH = "lmmrec-test-extract"
MICRO_CFG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
META = {
    "encoder": "clip",
    "arch": "ViT-B-16",
    "pretrained": "openai",
    "weights_sha256": "ab" * 32,
    "normalized": True,
    "n_with_image": 5,
}


@pytest.fixture(scope="module")
def micro_encoder(tmp_path_factory) -> ClipEncoder:
    path = tmp_path_factory.mktemp("configs") / f"{MICRO_ARCH}.json"
    path.write_text(json.dumps(MICRO_CFG))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    return ClipEncoder.from_arch(MICRO_ARCH)


def distinct_vectors(n: int, d: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_store_round_trip_with_polars_and_faiss(tmp_path):
    ids = np.array([7, 3, 11, 0, 5], dtype=np.int32)  # not in order, not contiguous
    image, text = distinct_vectors(5, 8, 1), distinct_vectors(5, 6, 2)
    write_feature_store(tmp_path / "fs", ids, image, text, META)

    df = pl.read_parquet(tmp_path / "fs" / "items.parquet")
    assert df.height == 5 and df["item_id"].to_list() == ids.tolist()
    assert df.schema["image"] == pl.Array(pl.Float32, 8)
    assert df.schema["text"] == pl.Array(pl.Float32, 6)
    np.testing.assert_array_equal(df["image"].to_numpy(), image)

    features = read_feature_store(tmp_path / "fs")
    assert features.metadata == {**META, "image_dim": 8, "text_dim": 6}
    np.testing.assert_array_equal(features.item_ids, ids)
    np.testing.assert_array_equal(features.text, text)
    assert features.image.dtype == np.float32

    for name, vectors in (("image", image), ("text", text)):
        index = faiss.read_index(str(tmp_path / "fs" / f"{name}.faiss"))
        assert index.ntotal == 5
        _, hits = index.search(vectors, 1)
        assert hits[:, 0].tolist() == ids.tolist()  # each item's own vector is its top hit


def test_nearest_items_uses_the_index(tmp_path):
    ids = np.arange(4, dtype=np.int32) + 10
    image = np.array([[1, 0], [0.9, 0.1], [0, 1], [-1, 0]], dtype=np.float32)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    write_feature_store(tmp_path / "fs", ids, image, image, META)
    near, scores = nearest_items(tmp_path / "fs", 10, "image", k=2)
    assert near.tolist() == [11, 12] and scores[0] > scores[1]
    assert 10 not in nearest_items(tmp_path / "fs", 10, "text", k=5)[0]
    with pytest.raises(ValueError, match="allowed: \\['image', 'text'\\]"):
        nearest_items(tmp_path / "fs", 10, "audio")
    with pytest.raises(KeyError, match="item_id 99"):
        nearest_items(tmp_path / "fs", 99, "image")


def test_store_rejects_bad_input_and_keeps_old_folder(tmp_path):
    ids = np.arange(3, dtype=np.int32)
    good = distinct_vectors(3, 4, 0)
    write_feature_store(tmp_path / "fs", ids, good, good, META)
    with pytest.raises(ValueError, match="shapes"):
        write_feature_store(tmp_path / "fs", ids, good[:2], good, META)
    with pytest.raises(ValueError, match="not unique"):
        write_feature_store(tmp_path / "fs", np.zeros(3, np.int32), good, good, META)
    with pytest.raises(ValueError, match="lacks \\['weights_sha256'\\]"):
        meta = {k: v for k, v in META.items() if k != "weights_sha256"}
        write_feature_store(tmp_path / "fs", ids, good, good, meta)
    bad = good.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        write_feature_store(tmp_path / "fs", ids, bad, good, META)
    np.testing.assert_array_equal(read_feature_store(tmp_path / "fs").image, good)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fs"]  # no temporaries left


def test_read_rejects_non_feature_files(tmp_path):
    (tmp_path / "fs").mkdir()
    pl.DataFrame({"item_id": [1], "image": [[0.1]], "text": [[0.2]]}).write_parquet(
        tmp_path / "fs" / "items.parquet"
    )
    with pytest.raises(ContractError, match="fixed-size list"):
        read_feature_store(tmp_path / "fs")
    with pytest.raises(FileNotFoundError, match="extract stage"):
        read_feature_store(tmp_path / "none")


def test_extract_is_normalised_ordered_and_batch_independent(micro_encoder):
    items = make_items(6)
    cfg = ExtractConfig(batch_size=4, num_workers=0, device="cpu")
    image, text = extract_features(micro_encoder, items, cfg)
    assert image.shape == (6, 24) and text.shape == (6, 24) and image.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(image, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1, atol=1e-5)
    assert np.abs(text[:, None] - text[None]).sum(-1)[~np.eye(6, dtype=bool)].min() > 1e-3

    image1, text1 = extract_features(micro_encoder, items, ExtractConfig(1, 0, device="cpu"))
    np.testing.assert_allclose(image1, image, atol=1e-5)
    np.testing.assert_allclose(text1, text, atol=1e-5)

    order = [5, 2, 0, 4, 1, 3]
    image_p, text_p = extract_features(micro_encoder, items.take(order), cfg)
    np.testing.assert_allclose(image_p, image[order], atol=1e-5)
    np.testing.assert_allclose(text_p, text[order], atol=1e-5)

    # worker processes decode the same pixels; raw vectors are the normalised ones rescaled
    image_w, raw_text = extract_features(
        micro_encoder, items, ExtractConfig(4, 2, normalize=False, device="cpu")
    )
    np.testing.assert_allclose(
        image_w / np.linalg.norm(image_w, axis=1, keepdims=True), image, atol=1e-5
    )
    assert not np.allclose(np.linalg.norm(raw_text, axis=1), 1)
    assert micro_encoder.training  # mode restored


def test_extract_then_store(micro_encoder, tmp_path):
    items = make_items(5)
    cfg = ExtractConfig(batch_size=2, num_workers=0, device="cpu")
    image, text = extract_features(micro_encoder, items, cfg)
    meta = feature_metadata(micro_encoder, items, cfg)
    assert meta["n_with_image"] == 3 and meta["n_items"] == 5 and meta["normalized"] is True
    write_feature_store(tmp_path / "fs", items.column("item_id").to_numpy(), image, text, meta)
    features = read_feature_store(tmp_path / "fs")
    assert features.metadata["encoder"] == "clip" and features.metadata["arch"] == MICRO_ARCH
    assert features.metadata["weights_sha256"] is None
    np.testing.assert_array_equal(features.image, image)


def test_real_vit_b16_architecture_gives_512d_features():
    torch.manual_seed(0)
    encoder = ClipEncoder.from_arch("ViT-B-16")  # random init: no download
    assert encoder.image_size == 224 and encoder.context_length == 77
    assert encoder.model.visual.conv1.kernel_size == (16, 16)  # the paper's patch size
    assert 149e6 < sum(p.numel() for p in encoder.parameters()) < 150e6  # ViT-B/16 CLIP: 149.6M
    image, text = extract_features(encoder, make_items(3), ExtractConfig(3, 0, device="cpu"))
    assert image.shape == (3, 512) and text.shape == (3, 512)
    assert image.dtype == text.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(image, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1, atol=1e-5)
    for vectors in (image, text):  # three different colours and texts: three different vectors
        assert np.abs(vectors[:, None] - vectors[None]).sum(-1)[~np.eye(3, dtype=bool)].min() > 1e-4


def test_bf16_extraction_stays_close_to_float32(micro_encoder):
    items = make_items(6)
    exact = extract_features(micro_encoder, items, ExtractConfig(batch_size=3, num_workers=0))
    fast = extract_features(
        micro_encoder, items, ExtractConfig(batch_size=3, num_workers=0, precision="bf16")
    )
    for a, b in zip(exact, fast, strict=True):
        assert not np.array_equal(a, b)  # bf16 really ran
        assert (a * b).sum(axis=1).min() > 0.99  # cosine of the two versions of each vector
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        extract_features(micro_encoder, items, ExtractConfig(precision="fp8"))
