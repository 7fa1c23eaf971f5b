"""Fine-tuning on item pairs: held-out retrieval before/after, skipped placeholders, the tag."""

import io
import json

import open_clip
import pyarrow as pa
import pytest
import torch
from test_encoders import MICRO_CFG, coloured_squares

from pipeline.data.schemas import ITEMS, validate
from pipeline.encoders.clip import ClipEncoder
from pipeline.encoders.finetune import finetune, item_pairs
from pipeline.encoders.pairtrain import PairTrainConfig

ARCH = "lmmrec-test-finetune"


@pytest.fixture(scope="module")
def arch(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("configs") / f"{ARCH}.json"
    path.write_text(json.dumps(MICRO_CFG))
    open_clip.add_model_config(path)
    return ARCH


def items_table(n: int) -> pa.Table:
    """n coloured-square items; every 10th has no real image (a grey placeholder)."""
    images, captions, _ = coloured_squares(n)
    blobs = []
    for img in images:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=95)
        blobs.append(buf.getvalue())
    rows = {
        "item_id": pa.array(range(n), pa.int32()),
        "asin": [f"B{i:09d}" for i in range(n)],
        "title": captions,
        "text": captions,
        "image_path": pa.array([None] * n, pa.string()),
        "image_bytes": blobs,
        "has_image": [i % 10 != 9 for i in range(n)],
    }
    return validate(pa.table(rows), ITEMS, "items")


def test_item_pairs_skip_items_without_image():
    items = items_table(20)
    images, texts = item_pairs(items)
    captions = items.column("text").to_pylist()
    assert texts == [c for i, c in enumerate(captions) if i not in (9, 19)]
    assert len(images) == 18 and images[0].mode == "RGB"


def test_finetune_raises_held_out_recall_and_retags(arch):
    torch.manual_seed(0)
    encoder = ClipEncoder.from_arch(arch)
    encoder.pretrained, encoder.source = "demo", "random init"
    cfg = PairTrainConfig(
        epochs=8, batch_size=16, lr=2e-3, warmup_steps=4, holdout=0.25, patience=3
    )
    metrics = finetune(encoder, items_table(80), cfg, "toyshop")
    assert metrics["n_pairs"] == 72 and metrics["n_items_without_image"] == 8
    assert metrics["n_held_out"] == 18
    assert metrics["after"]["i2t_r1"] > metrics["before"]["i2t_r1"]
    assert metrics["after"]["i2t_r10"] >= metrics["before"]["i2t_r10"]
    kept = metrics["kept_epoch"]
    assert metrics["after"]["i2t_r10"] == metrics["history"]["valid_i2t_r10"][kept]
    assert encoder.pretrained == "demo+finetuned:toyshop"
    assert "fine-tuned on toyshop item pairs (72 pairs" in encoder.source


def test_finetune_settings_take_the_encoders_own_overrides():
    from stages.params import ParamsError, encoder_section

    encoders = ["clip", "cnn_st", "vlmo"]

    section = {"lr": 1e-4, "epochs": 5, "vlmo": {"lr": 3e-4}, "clip": {"epochs": 2}}
    assert encoder_section(section, "vlmo", encoders, "finetune") == {"lr": 3e-4, "epochs": 5}
    assert encoder_section(section, "clip", encoders, "finetune") == {"lr": 1e-4, "epochs": 2}
    with pytest.raises(ParamsError, match="finetune.clip must be a mapping"):
        encoder_section({"clip": 3}, "clip", encoders, "finetune")
